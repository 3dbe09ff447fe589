#!/usr/bin/env bash
# Serve the embedded default models (models/) on http://127.0.0.1:8000 (HOST / PORT override).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m service
