#!/usr/bin/env bash
# Run the whole test suite, installing what it needs first (the venv, and Debian's chromium for
# the browser tests when running as root). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && [ -f .ci/install-browser.sh ]; then
  bash .ci/install-browser.sh
fi
exec .venv/bin/python -m pytest "$@"
