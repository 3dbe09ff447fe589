#!/usr/bin/env bash
# The recipe sweep on the held-out sites, end to end: every preset trained without each site
# (and without fold 0 of the two-site folds) and scored on what it did not train on, then one
# report ranking the recipes by their worst held-out site (training/reports/sites/report.md).
#
#   scripts/sites-sweep.sh                       # CPU, 2 threads: hours
#   DEVICE=cuda THREADS=8 scripts/sites-sweep.sh # a GPU: minutes
#   PRESETS="joint-sites-lite0 joint-sites-zoom-lite0" HOLDOUTS="site:bus-bra" scripts/sites-sweep.sh
#   PRESETS=joint-sites-zoom-lite0 HOLDOUTS="device:GE Logiq 5,device:GE Logiq 7" scripts/sites-sweep.sh
#
# A run whose result.json exists is kept, not trained again. Data folders: BUSI and BUS-BRA
# beside the repository (../shared/data/{busi,bus-bra}) unless DATA says otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
DATA=${DATA:-"../shared/data/busi ../shared/data/bus-bra"}
PRESETS=${PRESETS:-"joint-sites-lite0 joint-sites-zoom-lite0 joint-sites-zoom-lite1"}
HOLDOUTS=${HOLDOUTS:-"site:bus-bra,site:busi,fold:0"}  # comma-separated: scanners have spaces
DEVICE=${DEVICE:-cpu}
THREADS=${THREADS:-2}
IFS=',' read -r -a holdouts <<< "$HOLDOUTS"
runs=()
for preset in $PRESETS; do
  for holdout in "${holdouts[@]}"; do
    out="training/reports/sites/$preset/$(echo "$holdout" | tr ':' '-' | tr ' ' '-' | tr 'A-Z' 'a-z')"
    runs+=("$out")
    if [[ -f "$out/result.json" ]]; then
      echo "kept $out"
      continue
    fi
    # shellcheck disable=SC2086  # DATA is a list of folders
    "$PYTHON" -m training sites --preset "$preset" --data-path $DATA --holdout "$holdout" \
      --device "$DEVICE" --threads "$THREADS" --no-progress --output-dir "$out"
  done
done
"$PYTHON" -m training sites-report --runs "${runs[@]}"
