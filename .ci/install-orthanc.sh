#!/usr/bin/env bash
# Install Debian's Orthanc and its DICOMweb plugin for the PACS round-trip test
# (tests/service/test_orthanc_roundtrip.py). The test starts its own Orthanc on a loopback port with
# its own configuration; the system service the package sets up is stopped and disabled. Needs
# root; does nothing when both are there already.
set -euo pipefail
PLUGIN=/usr/share/orthanc/plugins/libOrthancDicomWeb.so
if [ -x /usr/sbin/Orthanc ] && [ -f "$PLUGIN" ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "install-orthanc: run as root to install orthanc (the round-trip test skips without it)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# Keep the package's own Orthanc service from starting (and taking port 4242/8042) in containers
# and on CI machines; the test runs its own instance.
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get update
apt-get install -y --no-install-recommends orthanc orthanc-dicomweb
/usr/sbin/Orthanc --version | head -n 1
