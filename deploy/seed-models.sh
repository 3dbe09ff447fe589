#!/bin/sh
# Seed the model volume with the embedded default artifacts, once.
#
# For each task in SEED_SOURCE (default /app/models, the api image's embedded models/) that has no
# version yet in MODEL_DIR (default /models), copy its versions in. Each version is copied into a
# hidden staging folder and renamed into place, like shared/store.py publishes, so the service
# (which skips hidden folders) never sees a half-copied version, and an interrupted seed is simply
# redone on the next start. A task that already has a version, seeded or trained, is left alone:
# the volume is the source of truth after the first start. The promotions record (which versions
# serve; shared/promotion.py) is seeded likewise, only into a volume that has none, so the seeded
# versions serve; an existing record is never touched (promote with `python -m training promote`).
set -eu

src=${SEED_SOURCE:-/app/models}
dst=${MODEL_DIR:-/models}

say() { printf '{"logger": "seed-models", "message": "%s"}\n' "$*"; }

if [ ! -w "$dst" ]; then
    say "model directory is not writable by uid $(id -u); nothing seeded"
    exit 1
fi

seeded=0
for task_dir in "$src"/*/; do
    [ -d "$task_dir" ] || continue
    task=$(basename "$task_dir")
    # Visible entries only: hidden ones are staging folders of an unfinished publish or seed.
    if [ -d "$dst/$task" ] && [ -n "$(ls "$dst/$task")" ]; then
        say "task $task already has versions; left alone"
        continue
    fi
    mkdir -p "$dst/$task"
    for version_dir in "$task_dir"*/; do
        [ -d "$version_dir" ] || continue
        version=$(basename "$version_dir")
        staging="$dst/$task/.seed-$version"
        rm -rf "$staging"
        cp -R "$version_dir" "$staging"
        sync
        mv "$staging" "$dst/$task/$version"
        say "seeded $task version $version"
        seeded=$((seeded + 1))
    done
done
if [ -f "$src/promotions.json" ] && [ ! -e "$dst/promotions.json" ]; then
    cp "$src/promotions.json" "$dst/.seed-promotions.json"
    sync
    mv "$dst/.seed-promotions.json" "$dst/promotions.json"
    say "seeded promotions.json"
fi
say "done: $seeded version(s) seeded"
