#!/usr/bin/env bash
# Install Debian's Prometheus for the monitoring tests (tests/deploy/test_monitoring_stack.py):
# `promtool check rules` on deploy/alerts.yml, and a real prometheus that scrapes a running
# service and evaluates every alert and dashboard expression. The tests start their own
# prometheus on a loopback port with their own configuration; the system service the package
# sets up is kept from starting. Needs root; does nothing when both binaries are there already.
set -euo pipefail
if [ -x /usr/bin/prometheus ] && [ -x /usr/bin/promtool ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "install-prometheus: run as root to install prometheus (the monitoring tests skip without it)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get update
apt-get install -y --no-install-recommends prometheus
/usr/bin/promtool --version | head -n 1
