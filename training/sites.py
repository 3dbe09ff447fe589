"""Several sites in one data layer, folds that keep sites and patients apart, and the validation
that measures generalisation: a recipe trained without a site (or a scanner, or a fold) and
scored on it, with figures per site.

    python -m training sites --data-path D1 D2 --holdout site:bus-bra [--preset P]
    python -m training sites --data-path D1 D2 --holdout fold:0
    python -m training sites --data-path D1 D2 --holdout device:"GE Logiq 5"
        trains the joint recipe on every image not held out, scores the held-out ones and writes
        `<output>/rows.json` (per image: site, device, group, label, probabilities, Dice, mask
        pixels), `<output>/result.json` (figures per site and per device, with intervals over
        groups) and `<output>/weights.pt` (the model's state dict, for publishing).
    python -m training sites-report --runs R1 R2 ... --output training/reports/sites/report.md
        one table of every run: held-out sites first, then the folds' per-site figures.

A folder is a site. Its name is the folder's, except that a folder with BUS-BRA's
`bus_data.csv` is the site `bus-bra`, whose patients (`Case`) are the groups and whose `Device`
column names the scanner. Other folders (BUSI) are grouped by near-duplicate images (the committed
`training/splits/busi.json` when it matches the folder, else computed) and have no recorded scanner.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import time
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.labels import CLASS_NAMES
from training import cli, distributed, engine
from training.data import (
    LoadedSplit,
    Sample,
    data_fingerprint,
    group_near_duplicates,
    groups_largest_first,
    load_folds,
    load_image,
    load_split_images,
    scan_dataset,
)
from training.metrics import group_bootstrap, roc_auc

log = logging.getLogger(__name__)

BUSBRA_SITE = "bus-bra"
BUSBRA_TABLE = "bus_data.csv"
UNRECORDED_DEVICE = "unrecorded"
SPLITS_DIR = Path(__file__).parent / "splits"
DEFAULT_SITE_FOLDS = SPLITS_DIR / "sites-5fold.json"
NORMAL, MALIGNANT = CLASS_NAMES.index("normal"), CLASS_NAMES.index("malignant")


# --- the data layer ------------------------------------------------------------------------------


def site_name(root: Path) -> str:
    """The site a folder holds: `bus-bra` for a folder with BUS-BRA's table, else its name."""
    root = Path(root)
    return BUSBRA_SITE if (root / BUSBRA_TABLE).is_file() else root.resolve().name.lower()


def _busbra_table(root: Path) -> dict[str, dict[str, str]]:
    with (Path(root) / BUSBRA_TABLE).open(newline="") as handle:
        return {row["ID"]: row for row in csv.DictReader(handle)}


def _short_device(name: str) -> str:
    """`GE Logiq 7 @10-14MHz` -> `GE Logiq 7`: the scanner, without the probe's band."""
    return name.split("@", 1)[0].strip() or UNRECORDED_DEVICE


def scan_site(root: Path, site: str | None = None) -> list[Sample]:
    """One site's samples with `site`, `group` and `device` filled; keys are `<site>/<key>`.

    Raises ValueError when a BUS-BRA image has no row in its table or a row's label disagrees
    with the class folder it is filed in.
    """
    root = Path(root)
    site = site or site_name(root)
    samples = scan_dataset(root)
    if (root / BUSBRA_TABLE).is_file():
        table = _busbra_table(root)
        out = []
        for s in samples:
            row = table.get(s.image_path.stem)
            if row is None:
                raise ValueError(f"{s.key}: no row in {BUSBRA_TABLE}")
            if row["Pathology"].strip().lower() != s.class_name:
                raise ValueError(f"{s.key}: filed as {s.class_name}, table says {row['Pathology']}")
            out.append(
                replace(
                    s,
                    key=f"{site}/{s.key}",
                    site=site,
                    group=f"{site}:patient{int(row['Case'])}",
                    device=_short_device(row["Device"]),
                )
            )
        return out
    groups = _committed_groups(samples) or group_near_duplicates([load_image(s) for s in samples])
    return [
        replace(s, key=f"{site}/{s.key}", site=site, group=f"{site}:{g}", device=UNRECORDED_DEVICE)
        for s, g in zip(samples, groups, strict=True)
    ]


def _committed_groups(samples: list[Sample]) -> list[int] | None:
    """The near-duplicate groups of training/splits/busi.json when its fingerprint is this
    folder's (the grouping is slow and was made once), else None."""
    path = SPLITS_DIR / "busi.json"
    if not path.is_file():
        return None
    document = json.loads(path.read_text())
    items = document["items"]
    if set(items) != {s.key for s in samples}:
        return None
    if document["fingerprint"]["sha256"] != data_fingerprint(samples)["sha256"]:
        return None
    return [int(items[s.key]["group"]) for s in samples]


def scan_sites(roots: list[Path]) -> list[Sample]:
    """Every sample of every folder, sorted by key. Raises ValueError when two folders are the
    same site."""
    names = [site_name(r) for r in roots]
    if len(set(names)) != len(names):
        raise ValueError(f"two data folders are the same site: {names}")
    samples = [s for root, name in zip(roots, names, strict=True) for s in scan_site(root, name)]
    return sorted(samples, key=lambda s: s.key)


def describe(samples: list[Sample]) -> dict[str, Any]:
    """Images, groups, classes and scanners per site: what an artifact was trained and validated
    on (the manifest's and /models' scope)."""
    out: dict[str, Any] = {}
    for site in sorted({s.site for s in samples}):
        mine = [s for s in samples if s.site == site]
        out[site] = {
            "images": len(mine),
            "groups": len({s.group for s in mine}),
            "classes": dict(sorted(Counter(s.class_name for s in mine).items())),
            "devices": dict(sorted(Counter(s.device for s in mine).items())),
        }
    return out


# --- folds ---------------------------------------------------------------------------------------


def make_site_folds(samples: list[Sample], k: int = 5, seed: int = 0) -> dict[str, Any]:
    """Grouped k folds over several sites, stratified by site and class: a group (patient or
    near-duplicate group) never straddles two folds, and every fold gets its share of each
    site's normal, benign and malignant groups (a group counts under its most severe label).
    Groups go largest first (ties shuffled by `seed`) to the fold furthest below its share of
    that (site, class), then of all images."""
    group_ids = {g: i for i, g in enumerate(dict.fromkeys(s.group for s in samples))}
    groups = [group_ids[s.group] for s in samples]
    members, order = groups_largest_first(groups, seed)
    filled: list[Counter] = [Counter() for _ in range(k)]
    sizes = [0] * k
    fold_of: dict[int, int] = {}
    for group in order:
        stratum = (samples[members[group][0]].site, max(samples[i].label for i in members[group]))
        fold = min(range(k), key=lambda f: (filled[f][stratum], sizes[f], f))
        fold_of[group] = fold
        filled[fold][stratum] += len(members[group])
        sizes[fold] += len(members[group])
    per_fold = []
    for f in range(k):
        per_fold.append(
            {f"{site}/{CLASS_NAMES[label]}": n for (site, label), n in sorted(filled[f].items())}
        )
    return {
        "k": k,
        "seed": seed,
        "items": {
            s.key: {"fold": fold_of[g], "group": s.group, "site": s.site}
            for s, g in zip(samples, groups, strict=True)
        },
        "per_fold": per_fold,
        "sites": describe(samples),
    }


def load_site_folds(path: Path, samples: list[Sample]) -> dict[str, dict[str, Any]]:
    """The fold items of a fold file (training.data.load_folds: the same check, one place).
    Raises ValueError when file and folders disagree."""
    return load_folds(path, samples)


def split_holdout(
    samples: list[Sample], holdout: str, folds: dict[str, dict[str, Any]] | None
) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices) for `site:<name>`, `device:<name>` or `fold:<k>`.

    Raises ValueError for an unknown kind, a name no sample has, or `fold:` without folds.
    """
    kind, _, name = holdout.partition(":")
    if kind == "site":
        held = [s.site == name for s in samples]
    elif kind == "device":
        held = [s.device == name for s in samples]
    elif kind == "fold":
        if folds is None:
            raise ValueError("fold holdout needs a fold file")
        held = [int(folds[s.key]["fold"]) == int(name) for s in samples]
    else:
        raise ValueError(f"holdout must be site:<name>, device:<name> or fold:<k>, not {holdout!r}")
    if not any(held):
        raise ValueError(f"holdout {holdout!r} matches no image")
    if all(held):
        raise ValueError(f"holdout {holdout!r} leaves nothing to train on")
    train = [i for i, h in enumerate(held) if not h]
    test = [i for i, h in enumerate(held) if h]
    return train, test


# --- figures -------------------------------------------------------------------------------------


def site_figures(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The figures of one set of scored images, defined whatever classes are present: accuracy,
    malignant AUC (malignant vs the rest) and sensitivity, lesion-vs-normal AUC, lesion Dice,
    the share of normal scans called a lesion (and drawn on by /diagnose) and of lesions called
    normal. NaN where the images hold no case of that kind."""
    nan = float("nan")
    if not rows:
        return {}
    y = np.asarray([r["label"] for r in rows])
    probs = np.asarray([r["probs"] for r in rows], dtype=np.float64)
    pred = probs.argmax(axis=1)
    malignant, normal = y == MALIGNANT, y == NORMAL
    lesion = ~normal
    dice = np.asarray([r["dice"] for r in rows])
    drawn = np.asarray([r["mask_pixels"] > 0 for r in rows])
    mixed = malignant.any() and (~malignant).any()
    every_class = len(set(y.tolist())) == len(CLASS_NAMES)
    return {
        "n": float(len(rows)),
        "accuracy": float((pred == y).mean()),
        "macro_auc": float(np.mean([roc_auc(probs[:, c], y == c) for c in range(len(CLASS_NAMES))]))
        if every_class
        else nan,
        "malignant_auc": roc_auc(probs[:, MALIGNANT], malignant) if mixed else nan,
        "malignant_sensitivity": float((pred[malignant] == MALIGNANT).mean())
        if malignant.any()
        else nan,
        "lesion_auc": roc_auc(1.0 - probs[:, NORMAL], lesion)
        if lesion.any() and normal.any()
        else nan,
        "lesion_dice": float(dice[lesion].mean()) if lesion.any() else nan,
        "normal_called_lesion": float((pred[normal] != NORMAL).mean()) if normal.any() else nan,
        "normal_with_lesion_diagnose": float((drawn & (pred != NORMAL))[normal].mean())
        if normal.any()
        else nan,
        "lesion_called_normal": float((pred[lesion] == NORMAL).mean()) if lesion.any() else nan,
    }


def predicted_mix(rows: list[dict[str, Any]]) -> dict[str, int]:
    """How many images were called each class."""
    counts = Counter(CLASS_NAMES[int(np.argmax(r["probs"]))] for r in rows)
    return {name: counts.get(name, 0) for name in CLASS_NAMES}


def figures_with_intervals(
    rows: list[dict[str, Any]], n_resamples: int, seed: int = 0
) -> dict[str, Any]:
    """`site_figures` with 95% intervals resampling groups (patients, near-duplicate groups)."""
    return {
        **site_figures(rows),
        "predicted": predicted_mix(rows),
        "ci95": group_bootstrap(rows, n_resamples, seed, figures=site_figures)
        if n_resamples
        else {},
    }


def breakdown(rows: list[dict[str, Any]], n_resamples: int) -> dict[str, Any]:
    """Figures of `rows` per site and per (site, scanner)."""
    by_site: dict[str, Any] = {}
    for site in sorted({r["site"] for r in rows}):
        mine = [r for r in rows if r["site"] == site]
        by_site[site] = {
            **figures_with_intervals(mine, n_resamples),
            "devices": {
                device: {**site_figures(sub), "predicted": predicted_mix(sub)}
                for device in sorted({r["device"] for r in mine})
                for sub in [[r for r in mine if r["device"] == device]]
            },
        }
    return by_site


# --- the driver ----------------------------------------------------------------------------------


def score(model: torch.nn.Module, preset: Any, data: LoadedSplit) -> list[dict[str, Any]]:
    """Per-image rows of the held-out images, as the service would answer them."""
    from training.joint import evaluate_images

    rows = evaluate_images(model, preset, data, None)
    return [
        {**row, "site": s.site, "device": s.device, "group": s.group}
        for row, s in zip(rows, data.samples, strict=True)
    ]


def sites_main(args: argparse.Namespace) -> dict[str, Any]:
    """Train the recipe on every image not held out, score the held-out ones, write the run."""
    from training.joint import JOINT, preprocessing_for, resolve_preset
    from training.runner import Run, train_model

    preset = resolve_preset(args)
    samples = scan_sites(args.data_path)
    folds = None
    if args.holdout.startswith("fold:"):
        folds_file = Path(args.split_file)
        if not folds_file.is_file() and distributed.is_main():
            log.warning("no fold file: making the site-stratified grouped folds at %s", folds_file)
            write_site_folds(samples, folds_file)
        distributed.barrier()
        folds = load_site_folds(folds_file, samples)
    if args.max_per_class or args.smoke:
        samples = subset_per_site_class(samples, args.max_per_class or 3)
    train_idx, test_idx = split_holdout(samples, args.holdout, folds)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    threads = engine.configure_threads(args.threads)
    device = engine.resolve_device(args.device)
    data = load_split_images(samples)
    trained_on = data.pick(train_idx)
    log.info(
        "holdout %s: training on %d images (%s), scoring %d",
        args.holdout,
        len(train_idx),
        json.dumps(describe(trained_on.samples)),
        len(test_idx),
    )
    run = Run(args, preset, output, device, threads, preprocessing_for(preset))
    run.data = {"train": trained_on}
    checkpoint = output / engine.CHECKPOINT_NAME
    model, fit = train_model(
        JOINT, run, seed=args.seed, checkpoint=checkpoint, resume=engine.resume_point(checkpoint)
    )
    history, seconds = fit.history, fit.seconds
    if not distributed.is_main():
        return {"rank": distributed.rank()}
    started = time.perf_counter()
    rows = score(model, preset, data.pick(test_idx))
    result = {
        "holdout": args.holdout,
        "preset": args.preset,
        "recipe": asdict(preset),
        "command": args.command_line,
        "seed": args.seed,
        "smoke": bool(args.smoke),
        "max_per_class": args.max_per_class or (3 if args.smoke else None),
        "threads": threads,
        "device": str(device),
        "train_seconds": round(seconds, 1),
        "score_seconds": round(time.perf_counter() - started, 1),
        "history": history.to_dict(),
        "trained_on": describe(trained_on.samples),
        "scored": describe(data.pick(test_idx).samples),
        "figures": breakdown(rows, args.bootstrap),
        "bootstrap": {"resamples": args.bootstrap, "unit": "patient or near-duplicate group"},
    }
    write_json(output / "rows.json", {"holdout": args.holdout, "rows": rows})
    write_json(output / "result.json", result)
    torch.save(engine.cpu_state(model), output / "weights.pt")
    (output / engine.CHECKPOINT_NAME).unlink(missing_ok=True)
    for site, fig in result["figures"].items():
        log.info("held out %s, site %s: %s", args.holdout, site, brief(fig))
    return result


def brief(fig: dict[str, Any]) -> str:
    keys = ("accuracy", "malignant_auc", "malignant_sensitivity", "lesion_dice")
    return ", ".join(f"{k} {fig[k]:.3f}" for k in keys if not math.isnan(fig[k]))


def subset_per_site_class(samples: list[Sample], n: int) -> list[Sample]:
    """The first `n` samples of each (site, class): a tiny data set with every site in it."""
    seen: Counter = Counter()
    out = []
    for s in samples:
        if seen[(s.site, s.label)] < n:
            seen[(s.site, s.label)] += 1
            out.append(s)
    return out


def write_site_folds(samples: list[Sample], path: Path, k: int = 5) -> dict[str, Any]:
    document = make_site_folds(samples, k)
    document["fingerprint"] = data_fingerprint(samples)
    write_json(Path(path), document, indent=1)
    return document


def write_json(path: Path, document: Any, indent: int | None = None) -> None:
    """Write atomically: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(document, indent=indent, sort_keys=indent is not None) + "\n")
    tmp.replace(path)


# --- the report ----------------------------------------------------------------------------------

REPORT_ROWS = (
    ("accuracy", "accuracy"),
    ("macro_auc", "macro AUC (one-vs-rest, sites with every class)"),
    ("malignant_auc", "malignant AUC"),
    ("malignant_sensitivity", "malignant sensitivity"),
    ("lesion_auc", "lesion-vs-normal AUC"),
    ("lesion_dice", "lesion Dice"),
    ("normal_called_lesion", "normals called a lesion"),
    ("normal_with_lesion_diagnose", "normals with a lesion drawn (/diagnose)"),
    ("lesion_called_normal", "lesions called normal"),
)


def figure_cell(fig: dict[str, Any], key: str) -> str:
    """`fig[key]` with its 95% interval for a report's table; '–' when it is undefined."""
    value = fig.get(key, float("nan"))
    if value is None or math.isnan(value):
        return "–"
    lo, hi = fig.get("ci95", {}).get(key, [float("nan"), float("nan")])
    if math.isnan(lo):
        return f"{value:.3f}"
    return f"{value:.3f} [{lo:.3f}, {hi:.3f}]"


SELECTION_FIGURES = (
    ("malignant_auc", "malignant AUC"),
    ("malignant_sensitivity", "malignant sensitivity"),
    ("lesion_dice", "lesion Dice"),
)


def held_out_site_figures(results: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """preset -> held-out site -> the figures recipes are selected on: those of the site's
    lesion images when the site has normal scans (a training set without them never saw a
    normal from it), else all its images."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for r in results:
        kind, _, site = r["holdout"].partition(":")
        if kind != "site" or site not in r["figures"]:
            continue
        fig = r.get("lesion_images", {}).get(site) or r["figures"][site]
        out.setdefault(r["preset"], {})[site] = fig
    return out


def recipe_table(results: list[dict[str, Any]]) -> list[str]:
    """Markdown lines comparing recipes on the sites they did not train on, best first by
    the worst held-out site's malignant AUC (the selection rule, fixed before any sweep ran);
    empty for fewer than two recipes."""
    by_recipe = held_out_site_figures(results)
    if len(by_recipe) < 2:
        return []
    every_site = sorted({site for sites in by_recipe.values() for site in sites})

    def worst(sites: dict[str, dict[str, Any]], key: str) -> float:
        return min(fig.get(key, float("nan")) for fig in sites.values())

    ranked = sorted(
        by_recipe.items(),
        key=lambda item: (-len(item[1]), -worst(item[1], "malignant_auc")),
    )
    lines = [
        "## Recipes on the held-out sites",
        "",
        "Each recipe trained without a site and scored on it (lesion images of a site with "
        "normal scans). Recipes are ranked by the malignant AUC of their worst held-out site, "
        "the rule fixed before the sweep; a recipe not yet run on every site is ranked after "
        "those that were, and its worst is over the sites it was run on.",
        "",
        "| recipe | "
        + " | ".join(
            f"{label} on {site}" for site in every_site for _, label in SELECTION_FIGURES[:2]
        )
        + " | worst-site malignant AUC | worst-site malignant sensitivity | worst-site Dice |",
        "|---|" + "---|" * (2 * len(every_site) + 3),
    ]
    for preset, sites in ranked:
        cells = [
            figure_cell(sites[site], key) if site in sites else "not run"
            for site in every_site
            for key, _ in SELECTION_FIGURES[:2]
        ]
        cells += [f"{worst(sites, key):.3f}" for key, _ in SELECTION_FIGURES]
        lines.append(f"| `{preset}` | " + " | ".join(cells) + " |")
    return [*lines, "", "## Every run", ""]


def render_sites_report(results: list[dict[str, Any]]) -> str:
    """Markdown: held-out sites first, then scanners, then folds; per site scored."""
    order = {"site": 0, "device": 1, "fold": 2, "folds": 3}
    results = sorted(
        results, key=lambda r: (order.get(r["holdout"].split(":")[0], 9), r["holdout"])
    )
    columns = [(r, site) for r in results for site in r["figures"]]
    several = len({r["preset"] for r in results}) > 1

    def head(r: dict[str, Any]) -> str:
        return f"{r['preset']}: {r['holdout']}" if several else r["holdout"]

    lines = [
        "# Generalisation across sites",
        "",
        "Each column is one run of `python -m training sites`: the recipe trained on every image "
        "except those held out (a site, a scanner or a fold), scored on the held-out images of "
        "the site named. 95% percentile intervals resample patients (BUS-BRA) or near-duplicate "
        "groups (BUSI). Class decisions are the argmax of the probabilities (flip-averaged "
        "where the recipe says so), the operating point the service answers with. A "
        "`folds:` column pools a recipe's fold runs: every image scored by the fold model that "
        "did not train on it (`python -m training sites-ensemble`).",
        "",
        *recipe_table(results),
        "| figure | " + " | ".join(f"{head(r)} → {site}" for r, site in columns) + " |",
        "|---|" + "---|" * len(columns),
        "| images scored | "
        + " | ".join(str(int(r["figures"][s]["n"])) for r, s in columns)
        + " |",
    ]
    for key, label in REPORT_ROWS:
        lines.append(
            f"| {label} | "
            + " | ".join(figure_cell(r["figures"][s], key) for r, s in columns)
            + " |"
        )
    lines.append(
        "| called normal / benign / malignant | "
        + " | ".join(
            " / ".join(str(r["figures"][s]["predicted"][c]) for c in CLASS_NAMES)
            for r, s in columns
        )
        + " |"
    )
    lesion_columns = [(r, site) for r in results for site in r.get("lesion_images", {})]
    if lesion_columns:
        lines += [
            "",
            "Lesion images only, of the sites with normal scans (how a site held out from a "
            "training set without normals is judged):",
            "",
            "| figure | "
            + " | ".join(f"{head(r)} → {site} lesions" for r, site in lesion_columns)
            + " |",
            "|---|" + "---|" * len(lesion_columns),
        ]
        for key, label in REPORT_ROWS:
            if key in ("lesion_auc", "normal_called_lesion", "normal_with_lesion_diagnose"):
                continue
            cells = [figure_cell(r["lesion_images"][site], key) for r, site in lesion_columns]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Per scanner (no intervals):", ""]
    lines += [
        "| run → site, scanner | images | accuracy | malignant sensitivity | Dice | called n/b/m |",
        "|---|---|---|---|---|---|",
    ]
    for r, site in columns:
        for device, fig in r["figures"][site]["devices"].items():
            lines.append(
                f"| {head(r)} → {site}, {device} | {int(fig['n'])} | "
                f"{figure_cell(fig, 'accuracy')} | {figure_cell(fig, 'malignant_sensitivity')} | "
                f"{figure_cell(fig, 'lesion_dice')} | "
                + " / ".join(str(fig["predicted"][c]) for c in CLASS_NAMES)
                + " |"
            )
    lines += ["", "Runs:", ""]
    for r in results:
        trained = ", ".join(f"{site} {d['images']}" for site, d in r["trained_on"].items())
        lines.append(
            f"- `{r['holdout']}`: preset `{r['preset']}`, trained on {trained} images in "
            f"{r['train_seconds'] / 60:.0f} min ({r['threads']} threads, {r['device']}); "
            f"`{r['command']}`"
        )
    lines.append("")
    return "\n".join(lines)


def lesion_only(run: Path, n_resamples: int) -> dict[str, Any]:
    """Per site with normal scans, the figures of its lesion images alone (a site held out
    from a training set without normals is judged on them: its normals were never learnable)."""
    rows = json.loads((Path(run) / "rows.json").read_text())["rows"]
    out = {}
    for site in sorted({r["site"] for r in rows}):
        mine = [r for r in rows if r["site"] == site]
        lesions = [r for r in mine if r["label"] != NORMAL]
        if len(lesions) < len(mine):
            out[site] = figures_with_intervals(lesions, n_resamples)
    return out


def report_main(args: argparse.Namespace) -> Path:
    results = [json.loads((Path(run) / "result.json").read_text()) for run in args.runs]
    for run, result in zip(args.runs, results, strict=True):
        # recomputed from the rows, so the report always holds the figures of this code
        rows = json.loads((Path(run) / "rows.json").read_text())["rows"]
        result["figures"] = breakdown(rows, result["bootstrap"]["resamples"])
        result["lesion_images"] = lesion_only(run, result["bootstrap"]["resamples"])
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render_sites_report(results))
    write_json(output.with_suffix(".json"), results, indent=1)
    return output


# --- publishing a run's model ---------------------------------------------------------------------


def _public(fig: dict[str, Any]) -> dict[str, Any]:
    """A site's figures for the manifest: the scalars and their intervals (no per-scanner)."""
    return _defined({k: v for k, v in fig.items() if k != "devices"})


def _defined(value: Any) -> Any:
    """`value` without the figures that are undefined (NaN) for its images: a manifest holds
    valid JSON, and a missing figure reads as "not measured here", which is what NaN meant."""
    if isinstance(value, dict):
        return {k: _defined(v) for k, v in value.items() if not _undefined(v)}
    if isinstance(value, list):
        return [_defined(v) for v in value]
    return value


def _undefined(value: Any) -> bool:
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, list) and value and all(isinstance(v, float) for v in value):
        return any(math.isnan(v) for v in value)
    return False


def manifest_metrics(run: Path, results: list[dict[str, Any]], n_resamples: int) -> dict[str, Any]:
    """The manifest's `metrics` for the model of run folder `run` (a fold holdout): the held-out
    site and scanner figures of the recipe first (other runs of the same recipe), then this very
    model's figures per site on the fold it did not train on, and, as the gate's headline
    (`cross_validation.plain`), that fold pooled over the sites."""
    from training.ensemble import is_ensemble
    from training.joint import summarise

    shipped = json.loads((Path(run) / "result.json").read_text())
    rows = json.loads((Path(run) / "rows.json").read_text())["rows"]
    # an ensemble serves its members without the flip averaging their runs were scored with:
    # the held-out sites' runs are this recipe's whatever their flip averaging
    same_recipe = [r for r in results if training_recipe(r) == training_recipe(shipped)]
    held_sites = {
        r["holdout"].split(":", 1)[1]: {
            **{site: _public(f) for site, f in r["figures"].items()},
            **{
                f"{site}_lesion_images": _public(f)
                for site, f in r.get("lesion_images", {}).items()
            },
        }
        for r in same_recipe
        if r["holdout"].startswith("site:")
    }
    held_devices = {
        r["holdout"].split(":", 1)[1]: {site: _public(f) for site, f in r["figures"].items()}
        for r in same_recipe
        if r["holdout"].startswith("device:")
    }
    if is_ensemble(shipped):
        members = shipped["ensemble"]
        sites_note = (
            f"sites: the recipe's {members['members']}-fold cross-validation, every image scored "
            "by the one fold model (member of this ensemble) that did not train on it, "
            f"{'with' if members['flip_tta'] else 'without'} flip averaging as served, per site; "
            "the ensemble averages those members, so no held-out figure of the ensemble itself "
            "exists; held_out_sites and held_out_scanners are single networks of the recipe"
        )
    else:
        sites_note = (
            f"sites: this model scored on the images of {shipped['holdout']} that it did not "
            "train on, per site"
        )
    return {
        "kind": "site-held-out",
        "note": (
            "held_out_sites: the recipe trained without a site, scored on it (read these "
            f"first: they are what a new hospital can expect); {sites_note}; "
            "cross_validation.plain: the same images pooled. 95% intervals resample patients "
            "or near-duplicate groups."
        ),
        "held_out_sites": held_sites,
        "held_out_scanners": held_devices,
        "sites": {site: _public(f) for site, f in breakdown(rows, n_resamples).items()},
        "scope": {
            "trained_on": shipped["trained_on"],
            "validated_on": shipped["scored"],
            "not_validated": (
                "sites, scanners, populations and image kinds other than those listed; "
                "no prospective validation"
            ),
        },
        "cross_validation": _defined(summarise({"plain": rows}, n_resamples)),
        "holdout": shipped["holdout"],
    }


def training_recipe(result: dict[str, Any]) -> dict[str, Any]:
    """What a run's model was trained with: its preset with the recipe it recorded, every field
    (a run recorded before a field existed trained with that field's preset value), less what
    only changes how the model is scored (flip averaging) and the description."""
    from training.export_onnx import joint_preset

    recipe = asdict(joint_preset({"preset": result["preset"], "recipe": result["recipe"]}))
    return {k: v for k, v in recipe.items() if k not in ("flip_tta", "description")}


def publish_main(args: argparse.Namespace) -> dict[str, Any]:
    """Publish the model of a `sites` run (its weights.pt) as a `diagnosis` candidate whose
    manifest carries the site-held-out figures of `--report` and its own per-site figures."""
    from training.ensemble import is_ensemble
    from training.joint import build_networks, publish, resolve_preset

    run = Path(args.run)
    shipped = json.loads((run / "result.json").read_text())
    args.preset, args.smoke = shipped["preset"], bool(shipped.get("smoke"))
    args.seed = shipped["seed"]
    args.no_flip_tta = not shipped["recipe"]["flip_tta"]
    preset = resolve_preset(args)
    if asdict(preset) != shipped["recipe"]:
        raise ValueError("the run's recipe differs from its preset's: publish with the same code")
    samples = scan_sites(args.data_path)
    holdout = shipped["holdout"]
    folds = load_site_folds(args.split_file, samples) if holdout.startswith("fold:") else None
    if shipped.get("max_per_class"):
        samples = subset_per_site_class(samples, int(shipped["max_per_class"]))
    if is_ensemble(shipped):  # every image trained all members but one
        trained_on = samples
    else:
        train_idx, _ = split_holdout(samples, holdout, folds)
        trained_on = [samples[i] for i in train_idx]
    if describe(trained_on) != shipped["trained_on"]:
        raise ValueError("the data folders are not the ones the run trained on")
    engine.configure_threads(args.threads)
    n_members = int(shipped.get("ensemble", {}).get("members", 1))
    model = build_networks(preset, n_members)
    model.load_state_dict(torch.load(run / "weights.pt", map_location="cpu", weights_only=True))
    model.eval()
    history = engine.History.from_dict(shipped["history"])
    results = json.loads(Path(args.report).read_text()) if args.report else [shipped]
    metrics = manifest_metrics(run, results, args.bootstrap)
    document = publish(
        args,
        preset,
        model,
        history,
        float(shipped["train_seconds"]),
        trained_on,
        metrics,
        {"sites": metrics, "source_run": str(run)},
        intended_use=intended_use(trained_on),
    )
    return document["artifact"]


def intended_use(trained_on: list[Sample]) -> str:
    """The manifest's intended use, naming the sites and scanners the model learnt from."""
    scope = describe(trained_on)
    sites_text = "; ".join(
        f"{site}: {d['images']} images, scanners {', '.join(sorted(d['devices']))}"
        for site, d in scope.items()
    )
    return (
        "Research use only; not a medical device; not for diagnosis or treatment decisions. "
        f"Trained on public breast-ultrasound data sets from {len(scope)} sites ({sites_text}) "
        "and validated on held-out patients of each and on each site held out in turn (see "
        "metrics.held_out_sites and metrics.sites); performance at other sites, on other "
        "scanners or populations is unknown."
    )


# --- command line --------------------------------------------------------------------------------


def parse_sites_args(argv: list[str]) -> argparse.Namespace:
    from training.joint import PRESETS

    parser = cli.training_parser(
        "python -m training sites",
        "Train the joint recipe without a site, scanner or fold and score it on what was held out",
        presets=PRESETS,
        default_preset="joint-sites-lite0",
        default_output="training/reports/sites/<preset>/<holdout>",
        split_file=DEFAULT_SITE_FOLDS,
        split_help="the site-stratified grouped fold file (default: "
        "training/splits/sites-5fold.json; made there when absent)",
        model_dir=False,
        bootstrap=1000,
        multi_data=True,
    )
    parser.add_argument(
        "--holdout",
        required=True,
        help="what to hold out: site:<name> (e.g. site:bus-bra), device:<scanner> "
        "(e.g. 'device:GE Logiq 5') or fold:<k>; required",
    )
    parser.add_argument("--no-flip-tta", action="store_true", help="score without flip averaging")
    args = cli.parse(parser, argv, "sites")
    if args.output_dir is None:
        safe = args.holdout.replace(":", "-").replace(" ", "-").lower()
        args.output_dir = Path("training/reports/sites") / args.preset / safe
    return args


def parse_publish_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m training sites-publish",
        description="Publish the model of a `sites` run as a diagnosis candidate, its manifest "
        "carrying the held-out-site figures of a sites report and its own per-site figures",
    )
    parser.add_argument("--run", type=Path, required=True, help="the `sites` run folder")
    parser.add_argument(
        "--data-path", type=Path, nargs="+", required=True, help="the folders it trained on"
    )
    parser.add_argument(
        "--split-file",
        type=Path,
        default=DEFAULT_SITE_FOLDS,
        help="the fold file of a fold:<k> run (default: training/splits/sites-5fold.json)",
    )
    parser.add_argument(
        "--report", type=Path, default=None, help="report.json of `sites-report` (default: none)"
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=Path("runs/candidate-models"),
        help="publish into this model directory (default: runs/candidate-models)",
    )
    parser.add_argument("--version", default=None, help="artifact version (default: UTC time)")
    parser.add_argument("--name", default=None, help="artifact name (default: the preset)")
    parser.add_argument(
        "--calibration",
        type=Path,
        default=None,
        help="manifest.json of `python -m training calibrate` (default: uncalibrated)",
    )
    parser.add_argument("--output-dir", type=Path, default=None, help="default: <run>/publish")
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples (default: 1000)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: 0)")
    parser.add_argument("--device", default="cpu", help="export device (default: cpu)")
    args = parser.parse_args(argv)
    args.command, args.command_line = "sites-publish", cli.command_line("sites-publish", argv)
    args.output_dir = args.output_dir or args.run / "publish"
    args.no_flip_tta, args.smoke, args.no_progress = False, False, True
    args.epochs = args.batch_size = args.lr = args.image_size = None
    return args


def parse_report_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m training sites-report",
        description="One markdown table of several `python -m training sites` runs",
    )
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="run folders")
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("training/reports/sites/report.md"),
        help="report to write, with its .json beside it "
        "(default: training/reports/sites/report.md)",
    )
    return parser.parse_args(argv)
