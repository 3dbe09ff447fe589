#!/usr/bin/env bash
# Run the whole test suite, installing what it needs first (the venv; when running as root,
# Debian's chromium for the browser tests, orthanc for the PACS round trip and prometheus for the
# monitoring tests). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && [ -f .ci/install-browser.sh ]; then
  bash .ci/install-browser.sh
fi
# Orthanc + its DICOMweb plugin for the PACS round-trip test, which skips with the reason without.
if [ ! -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] && [ "$(id -u)" = 0 ] \
    && [ -f .ci/install-orthanc.sh ]; then
  bash .ci/install-orthanc.sh || echo "test.sh: orthanc could not be installed" >&2
fi
# Debian's prometheus (promtool and the server) for the monitoring tests, which skip without it.
if [ ! -x /usr/bin/promtool ] && [ "$(id -u)" = 0 ] && [ -f .ci/install-prometheus.sh ]; then
  bash .ci/install-prometheus.sh || echo "test.sh: prometheus could not be installed" >&2
fi
exec .venv/bin/python -m pytest "$@"
