"""BUSI-layout data sets: scanning the folder, near-duplicate grouping, the grouped split.

Layout: `<root>/<class>/<name>.png` with `<name>_mask.png` and, for images with several lesions,
`<name>_mask_1.png`, `<name>_mask_2.png`, ... which are OR-merged. Class folders are the names in
shared.labels.CLASS_NAMES.

BUSI has no patient ids and many near-duplicate images (the same lesion scanned twice, crops of
one another, a few filed under two classes). Splitting image by image would put copies of a test
image in the training set, so images are grouped by perceptual similarity (union-find over a DCT
perceptual hash and a thumbnail correlation) and the split is made by group.

The same groups make the grouped k folds of cross-validation (`make_folds`, `write_folds`,
`load_folds`; `training/splits/busi-5fold.json`) and `fold_split`, a train / val / test split
whose test split is one fold.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Sampler

from shared.decoding import decode_image
from shared.labels import CLASS_NAMES

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SPLITS_DIR = Path(__file__).parent / "splits"
DEFAULT_FOLDS_FILE = SPLITS_DIR / "busi-5fold.json"
GROUPS_FILE = SPLITS_DIR / "busi.json"
_MASK_RE = re.compile(r"^(?P<stem>.+)_mask(?:_\d+)?$")


@dataclass(frozen=True)
class Sample:
    """One image of the data set. `key` is `<class>/<file name>` (`<site>/<class>/<file name>`
    when several sites are read together), stable across machines."""

    key: str
    image_path: Path
    mask_paths: tuple[Path, ...]
    label: int
    # training.sites fills these when several sites are read together: the site (hospital),
    # the group a split must keep together (near-duplicate group or patient) and the scanner.
    site: str = ""
    group: str = ""
    device: str = ""

    @property
    def class_name(self) -> str:
        return CLASS_NAMES[self.label]


def scan_dataset(root: Path) -> list[Sample]:
    """All images under `root` in BUSI layout, sorted by key. Raises FileNotFoundError if empty."""
    root = Path(root)
    samples: list[Sample] = []
    for label, class_name in enumerate(CLASS_NAMES):
        folder = root / class_name
        if not folder.is_dir():
            continue
        masks: dict[str, list[Path]] = {}
        images: list[Path] = []
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in {".png", ".jpg", ".jpeg"}:
                continue
            match = _MASK_RE.match(path.stem)
            if match:
                masks.setdefault(match["stem"], []).append(path)
            else:
                images.append(path)
        for path in images:
            samples.append(
                Sample(
                    key=f"{class_name}/{path.name}",
                    image_path=path,
                    mask_paths=tuple(sorted(masks.get(path.stem, []))),
                    label=label,
                )
            )
    if not samples:
        raise FileNotFoundError(f"no images in BUSI layout under {root}")
    return sorted(samples, key=lambda s: s.key)


def load_image(sample: Sample) -> np.ndarray:
    """The (H, W) uint8 image, decoded exactly as the service decodes an upload."""
    return decode_image(sample.image_path.read_bytes()).pixels


def load_mask(sample: Sample, shape: tuple[int, int]) -> np.ndarray:
    """The OR-merge of the sample's masks as (H, W) uint8 0/255; all zero if it has none."""
    merged = np.zeros(shape, dtype=bool)
    for path in sample.mask_paths:
        with Image.open(path) as im:
            mask = np.asarray(im.convert("L"))
        if mask.shape != shape:
            mask = np.asarray(Image.fromarray(mask).resize(shape[::-1], Image.Resampling.NEAREST))
        merged |= mask > 127
    return np.where(merged, 255, 0).astype(np.uint8)


def data_fingerprint(samples: list[Sample]) -> dict[str, object]:
    """sha256 over every key and file content: identifies exactly which data trained a model."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(sample.key.encode())
        for path in (sample.image_path, *sample.mask_paths):
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    counts = Counter(s.class_name for s in samples)
    return {"sha256": digest.hexdigest(), "n_images": len(samples), "per_class": dict(counts)}


@dataclass
class LoadedSplit:
    """Decoded images and merged masks of one split, in memory (BUSI is ~600 scans)."""

    samples: list[Sample]
    images: list[np.ndarray]
    masks: list[np.ndarray]

    @property
    def class_names(self) -> list[str]:
        return [s.class_name for s in self.samples]

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]

    def pick(self, indices: list[int]) -> LoadedSplit:
        return LoadedSplit(
            [self.samples[i] for i in indices],
            [self.images[i] for i in indices],
            [self.masks[i] for i in indices],
        )

    def subset(self, keep: list[bool]) -> LoadedSplit:
        return self.pick([i for i, k in enumerate(keep) if k])


def load_split_images(samples: list[Sample]) -> LoadedSplit:
    """Decode `samples` (images as the service decodes them, OR-merged masks) into memory."""
    images = [load_image(s) for s in samples]
    masks = [load_mask(s, im.shape) for s, im in zip(samples, images, strict=True)]
    return LoadedSplit(list(samples), images, masks)


# --- near-duplicate grouping ---------------------------------------------------------------------


def _phash(pixels: np.ndarray) -> np.ndarray:
    """64-bit DCT perceptual hash (as 64 booleans) of a grayscale image."""
    from scipy.fft import dctn

    small = np.asarray(
        Image.fromarray(pixels).resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64
    )
    low = dctn(small, norm="ortho")[:8, :8].flatten()
    return low > np.median(low[1:])


def _thumbnail(pixels: np.ndarray, side: int = 24) -> np.ndarray:
    small = np.asarray(
        Image.fromarray(pixels).resize((side, side), Image.Resampling.BILINEAR), dtype=np.float64
    ).flatten()
    small -= small.mean()
    norm = np.linalg.norm(small)
    return small / norm if norm > 0 else small


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)


def group_near_duplicates(
    images: list[np.ndarray], max_hamming: int = 8, min_correlation: float = 0.95
) -> list[int]:
    """Group ids (0..G-1, in order of first appearance) joining images that look alike.

    Two images are joined when their perceptual hashes differ in at most `max_hamming` of 64
    bits, or when their 24x24 thumbnails correlate at `min_correlation` or more; groups are the
    connected components (union-find), so chains of near-copies end up together.
    """
    hashes = np.stack([_phash(im) for im in images]).astype(np.int16)
    thumbs = np.stack([_thumbnail(im) for im in images])
    hamming = (hashes[:, None, :] != hashes[None, :, :]).sum(axis=2)
    correlation = thumbs @ thumbs.T
    similar = (hamming <= max_hamming) | (correlation >= min_correlation)
    uf = _UnionFind(len(images))
    for i, j in zip(*np.nonzero(np.triu(similar, k=1)), strict=True):
        uf.union(int(i), int(j))
    roots: dict[int, int] = {}
    return [roots.setdefault(uf.find(i), len(roots)) for i in range(len(images))]


def groups_largest_first(groups: list[int], seed: int) -> tuple[dict[int, list[int]], list[int]]:
    """The member indices of each group, and the groups in the order grouped splitters place
    them: largest first, ties shuffled by `seed`."""
    members: dict[int, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    order = list(members)
    random.Random(seed).shuffle(order)
    order.sort(key=lambda g: -len(members[g]))
    return members, order


def grouped_stratified_split(
    labels: list[int],
    groups: list[int],
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> list[str]:
    """Assign every item to train / val / test so that a group never straddles two splits.

    A group is stratified by its most severe label (malignant > benign > normal), so a lesion
    filed under two classes counts where it matters most. Groups are taken largest first (ties
    shuffled by `seed`) and each goes to the split furthest below its target for that class.
    """
    members, order = groups_largest_first(groups, seed)
    group_label = {g: max(labels[i] for i in members[g]) for g in members}
    totals = Counter(group_label[g] for g in members for _ in members[g])
    filled = {split: Counter() for split in SPLITS}
    assignment: dict[int, str] = {}
    for group in order:
        label = group_label[group]
        size = len(members[group])
        deficits = [
            (fractions[k] * totals[label] - filled[split][label], -k, split)
            for k, split in enumerate(SPLITS)
        ]
        split = max(deficits)[2]
        assignment[group] = split
        filled[split][label] += size
    return [assignment[g] for g in groups]


def make_split(root: Path, seed: int = 0) -> dict[str, object]:
    """Scan, group and split the data set under `root`; returns the split document."""
    samples = scan_dataset(root)
    images = [load_image(s) for s in samples]
    labels = [s.label for s in samples]
    groups = group_near_duplicates(images)
    splits = grouped_stratified_split(labels, groups, seed=seed)
    group_classes: dict[int, set[int]] = {}
    for group, label in zip(groups, labels, strict=True):
        group_classes.setdefault(group, set()).add(label)
    sizes = Counter(groups)
    summary = {
        "n_images": len(samples),
        "n_groups": len(sizes),
        "n_groups_with_duplicates": sum(1 for n in sizes.values() if n > 1),
        "n_images_in_duplicate_groups": sum(n for n in sizes.values() if n > 1),
        "n_cross_class_groups": sum(1 for c in group_classes.values() if len(c) > 1),
        "per_split": {
            split: dict(
                Counter(s.class_name for s, sp in zip(samples, splits, strict=True) if sp == split)
            )
            for split in SPLITS
        },
    }
    log.info("split made: %s", json.dumps(summary))
    return {
        "seed": seed,
        "fingerprint": data_fingerprint(samples),
        "summary": summary,
        "items": {
            s.key: {"split": sp, "group": g}
            for s, sp, g in zip(samples, splits, groups, strict=True)
        },
    }


def subset_per_class(samples: list[Sample], n: int) -> list[Sample]:
    """The first `n` samples of each class, in order: a tiny but complete data set (smoke runs)."""
    out: list[Sample] = []
    seen: Counter[int] = Counter()
    for sample in samples:
        if seen[sample.label] < n:
            seen[sample.label] += 1
            out.append(sample)
    return out


def resolve_split(
    data_path: Path, split_file: Path | None, fallback: Path, seed: int = 0
) -> tuple[list[Sample], dict[str, list[Sample]], Path]:
    """Scan `data_path` and split it by the split file, making and saving one when it is absent.

    Returns the samples, the samples per split and the split file used: `split_file` when it
    exists, else a new grouped split (seed `seed`) saved at `fallback`. Raises ValueError when an
    existing split file does not match the folder.
    """
    samples = scan_dataset(data_path)
    if split_file is not None and Path(split_file).is_file():
        path = Path(split_file)
    else:
        path = Path(fallback)
        log.warning("no split file: making the grouped split (seed %d) at %s", seed, path)
        save_split(make_split(data_path, seed=seed), path)
    return samples, load_split(path, samples), path


def save_split(document: dict[str, object], path: Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")


def load_split(path: Path, samples: list[Sample]) -> dict[str, list[Sample]]:
    """Samples per split from a split file. Raises ValueError when file and folder disagree."""
    items = json.loads(Path(path).read_text())["items"]
    keys = {s.key for s in samples}
    if set(items) != keys:
        missing, extra = len(keys - set(items)), len(set(items) - keys)
        raise ValueError(
            f"split file does not match the data folder ({missing} images not in the split, "
            f"{extra} split entries without an image)"
        )
    out: dict[str, list[Sample]] = {split: [] for split in SPLITS}
    for sample in samples:
        out[items[sample.key]["split"]].append(sample)
    return out


# --- cross-validation folds ------------------------------------------------------------------


def make_folds(
    keys: list[str], labels: list[int], groups: list[int], k: int = 5, seed: int = 0
) -> dict[str, Any]:
    """Grouped, class-stratified k folds: a near-duplicate group never straddles two folds.

    A group counts under its most severe label; groups go largest first (ties shuffled by
    `seed`) to the fold furthest below its share of that class, then of all images.
    """
    members, order = groups_largest_first(groups, seed)
    filled = [[0] * len(CLASS_NAMES) for _ in range(k)]
    sizes = [0] * k
    fold_of: dict[int, int] = {}
    for group in order:
        label = max(labels[i] for i in members[group])
        fold = min(range(k), key=lambda f: (filled[f][label], sizes[f], f))
        fold_of[group] = fold
        filled[fold][label] += len(members[group])
        sizes[fold] += len(members[group])
    return {
        "k": k,
        "seed": seed,
        "items": {
            key: {"fold": fold_of[g], "group": g} for key, g in zip(keys, groups, strict=True)
        },
        "per_fold": [
            {CLASS_NAMES[c]: filled[f][c] for c in range(len(CLASS_NAMES))} for f in range(k)
        ],
    }


def load_folds(path: Path, samples: list[Sample]) -> dict[str, dict[str, int]]:
    items = json.loads(Path(path).read_text())["items"]
    keys = {s.key for s in samples}
    if set(items) != keys:
        raise ValueError(
            f"fold file {path} does not match the data folder "
            f"({len(keys - set(items))} images not in it, {len(set(items) - keys)} extra)"
        )
    return items


def write_folds(data_path: Path, path: Path, samples: list[Sample] | None = None) -> None:
    """Make and save the grouped 5-fold split, reusing the groups of the committed split file
    when it matches the folder (else computing them)."""
    samples = samples or scan_dataset(data_path)
    keys = [s.key for s in samples]
    groups_doc = json.loads(GROUPS_FILE.read_text())["items"] if GROUPS_FILE.is_file() else {}
    if set(groups_doc) == set(keys):
        groups = [int(groups_doc[k]["group"]) for k in keys]
    else:
        groups = group_near_duplicates([load_image(s) for s in samples])
    document = make_folds(keys, [s.label for s in samples], groups)
    document["fingerprint"] = data_fingerprint(samples)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")


def fold_split(folds_doc: dict[str, Any], fold: int, val_fraction: float = 0.15) -> dict:
    """A train / val / test split file (training.data's format) whose test split is CV fold
    `fold`, so the separate classification and segmentation jobs can be scored on exactly the
    images a joint fold model was scored on. Val is a grouped, stratified `val_fraction` of the
    other folds (those jobs choose checkpoints and thresholds on it); train is the rest."""
    items = folds_doc["items"]
    rest = sorted(k for k, v in items.items() if v["fold"] != fold)
    labels = [CLASS_NAMES.index(k.split("/", 1)[0]) for k in rest]
    groups = [int(items[k]["group"]) for k in rest]
    splits = grouped_stratified_split(labels, groups, (1 - val_fraction, val_fraction, 0.0))
    out = {k: {"split": "test", "group": v["group"]} for k, v in items.items() if v["fold"] == fold}
    for key, split, group in zip(rest, splits, groups, strict=True):
        out[key] = {"split": split, "group": group}
    return {"seed": 0, "from_folds": {"fold": fold, "val_fraction": val_fraction}, "items": out}


# --- sampling ----------------------------------------------------------------------------------


def site_weights(samples: list[Sample]) -> np.ndarray:
    """Per-sample draw probabilities that give every site the same share of an epoch (each
    site's images equally likely within it); uniform when the samples come from one site."""
    counts = Counter(s.site for s in samples)
    weights = np.array([1.0 / (len(counts) * counts[s.site]) for s in samples])
    return weights / weights.sum()


class SiteBalancedSampler(Sampler[int]):
    """Epochs of len(samples) draws, with replacement, in which every site weighs the same
    (`site_weights`): a small site is seen as often as a large one. Under torchrun every rank
    draws the same epoch (seeded by `seed` and the epoch's number) and takes its own
    `rank::num_replicas` share of it, as DistributedSampler does."""

    def __init__(
        self, samples: list[Sample], seed: int = 0, num_replicas: int = 1, rank: int = 0
    ) -> None:
        if not samples:
            raise ValueError("no samples to draw from")
        self.weights = torch.from_numpy(site_weights(samples))
        self.total = len(samples) - len(samples) % num_replicas
        self.seed, self.num_replicas, self.rank = seed, num_replicas, rank
        self.epoch = 0

    def __len__(self) -> int:
        return self.total // self.num_replicas

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1  # the next pass is the next epoch, on every rank alike
        drawn = torch.multinomial(self.weights, self.total, replacement=True, generator=generator)
        return iter(drawn[self.rank :: self.num_replicas].tolist())
