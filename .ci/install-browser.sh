#!/usr/bin/env bash
# Install Debian's chromium for the browser tests of the clinician page (tests marked `browser`).
# Playwright drives this binary directly (executable_path=/usr/bin/chromium), so no browser is
# downloaded by Playwright. Needs root; does nothing when chromium is already there.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "install-browser: run as root to install chromium (the browser tests skip without it)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y chromium
/usr/bin/chromium --version
