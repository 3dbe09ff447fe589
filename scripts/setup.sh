#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv with everything the service, the
# training jobs and the tests need. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-$(cat requirements/torch.txt pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  # torch first, from the pins in requirements/torch.txt (the one place they are written)
  .venv/bin/python -m pip install --quiet -r requirements/torch.txt
  .venv/bin/python -m pip install --quiet -e ".[service,train,dev]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
