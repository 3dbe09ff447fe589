#!/usr/bin/env bash
# Cross-validate the separate recipes on the committed grouped folds, for `training compare-cv`:
#   bash scripts/cv-recipes.sh ../shared/data/busi [runs/cv-pair]      (FOLDS="0 1" to limit)
# Per fold k: a split whose test set is fold k; the separate pair's classifier and segmenter
# into <out>/models-f<k>; the 4-channel classifier fed that segmenter's predicted masks into
# models-f<k>-4ch; the seed's two recipes into models-f<k>-seed. Each run takes 15-50 min on one
# core; run two of these scripts with different FOLDS side by side on two cores.
set -euo pipefail
D=${1:?usage: cv-recipes.sh DATA_DIR [OUT_DIR]}
R=${2:-runs/cv-pair}
PY=${PY:-.venv/bin/python}
mkdir -p "$R"
for k in ${FOLDS:-0 1 2 3 4}; do
    $PY -m training fold-split --fold "$k" --output "$R/fold$k.json"
    common=(--data-path "$D" --split-file "$R/fold$k.json" --threads 1 --no-progress)
    $PY -m training classify --preset effnet-lite0 "${common[@]}" \
        --output-dir "$R/f$k-effnet-lite0" --model-dir "$R/models-f$k"
    $PY -m training segment --preset unet-effnet-lite0-gated "${common[@]}" \
        --output-dir "$R/f$k-unet-effnet-lite0-gated" --model-dir "$R/models-f$k"
    $PY -m training classify --preset effnet-lite0 "${common[@]}" \
        --mask-channel predicted --segmenter "$R/models-f$k" \
        --output-dir "$R/f$k-effnet-lite0-4ch" --model-dir "$R/models-f$k-4ch"
    $PY -m training segment --preset seed-attention-unet "${common[@]}" \
        --output-dir "$R/f$k-seed-attention-unet" --model-dir "$R/models-f$k-seed"
    $PY -m training classify --preset seed-resnet18 "${common[@]}" \
        --output-dir "$R/f$k-seed-resnet18" --model-dir "$R/models-f$k-seed"
done
