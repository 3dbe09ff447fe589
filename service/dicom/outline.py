"""The findings of a lesion mask: each connected region, its area and its outline.

An outline is the region's outer border traced along pixel edges, in the image coordinates of
PS3.3 C.18.6.1.1 and C.10.5.1.2 (column, row; the top-left pixel's top-left corner at 0, 0), as a
closed polyline (the first point repeated). It follows the mask exactly, so a viewer draws what
the SEG holds; holes are inside the outline (the area counts only lesion pixels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# A finding smaller than this is noise to a reader, not a lesion to outline.
MIN_FINDING_PIXELS = 4
# The most findings one report lists, the largest first.
MAX_FINDINGS = 10


@dataclass(frozen=True)
class Finding:
    """One 8-connected region of the mask."""

    pixels: int
    outline: np.ndarray  # (N, 2) float (column, row), closed: the last point is the first
    bbox: tuple[int, int, int, int]  # x, y, width, height


def findings(mask: np.ndarray) -> list[Finding]:
    """The regions of a (H, W) mask (nonzero: lesion), the largest first, at most MAX_FINDINGS
    of at least MIN_FINDING_PIXELS pixels."""
    mask = np.asarray(mask) > 0
    found = []
    for runs in _components(mask):
        pixels = sum(end - start for _, start, end in runs)
        if pixels < MIN_FINDING_PIXELS:
            continue
        rows = [r for r, _, _ in runs]
        top, bottom = min(rows), max(rows) + 1
        left, right = min(s for _, s, _ in runs), max(e for _, _, e in runs)
        region = np.zeros((bottom - top, right - left), dtype=bool)
        for r, start, end in runs:
            region[r - top, start - left : end - left] = True
        outline = _trace(region) + np.array([left, top], dtype=float)
        found.append(Finding(pixels, outline, (left, top, right - left, bottom - top)))
    found.sort(key=lambda f: (-f.pixels, f.bbox[1], f.bbox[0]))
    return found[:MAX_FINDINGS]


def _components(mask: np.ndarray) -> list[list[tuple[int, int, int]]]:
    """8-connected regions as lists of (row, start column, end column) runs (union-find on runs)."""
    runs: list[tuple[int, int, int]] = []
    row_runs: list[list[int]] = []
    for r in range(mask.shape[0]):
        line = np.concatenate(([0], mask[r].view(np.int8), [0]))
        edges = np.flatnonzero(np.diff(line))
        indices = []
        for start, end in zip(edges[::2], edges[1::2], strict=True):
            indices.append(len(runs))
            runs.append((r, int(start), int(end)))
        row_runs.append(indices)
    parent = list(range(len(runs)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for r in range(1, len(row_runs)):
        above = row_runs[r - 1]
        for i in row_runs[r]:
            _, start, end = runs[i]
            for j in above:
                _, s, e = runs[j]
                if s <= end and e >= start:  # overlapping or touching diagonally
                    parent[root(i)] = root(j)
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for i, run in enumerate(runs):
        groups.setdefault(root(i), []).append(run)
    return list(groups.values())


def _trace(region: np.ndarray) -> np.ndarray:
    """The outer border of one 8-connected region, clockwise on screen, along pixel edges."""
    padded = np.pad(region, 1)
    inside = padded[1:-1, 1:-1]
    rows, cols = np.nonzero(inside)
    outgoing: dict[tuple[int, int], list[tuple[int, int]]] = {}

    def add(starts_x, starts_y, dx, dy) -> None:
        for x, y in zip(starts_x.tolist(), starts_y.tolist(), strict=True):
            outgoing.setdefault((x, y), []).append((dx, dy))

    # The region on the right of each directed edge (y grows downwards).
    top = ~padded[:-2, 1:-1][rows, cols]
    right = ~padded[1:-1, 2:][rows, cols]
    bottom = ~padded[2:, 1:-1][rows, cols]
    left = ~padded[1:-1, :-2][rows, cols]
    add(cols[top], rows[top], 1, 0)
    add(cols[right] + 1, rows[right], 0, 1)
    add(cols[bottom] + 1, rows[bottom] + 1, -1, 0)
    add(cols[left], rows[left] + 1, 0, -1)
    start = (int(cols[0]), int(rows[0]))  # the first pixel in raster order: its top-left corner
    points = [start]
    x, y, direction = start[0], start[1], (1, 0)
    while True:
        x, y = x + direction[0], y + direction[1]
        if (x, y) == start:
            break
        options = outgoing[(x, y)]
        if len(options) > 1:
            # A corner two pixels touch diagonally: turn left, towards the other pixel, so the
            # border goes round the whole 8-connected region.
            left_turn = (direction[1], -direction[0])
            choice = left_turn if left_turn in options else options[0]
        else:
            choice = options[0]
        if choice != direction:
            points.append((x, y))
        direction = choice
    points.append(start)
    return np.array(points, dtype=float)
