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


@dataclass(frozen=True)
class TrackedFinding:
    """A finding and its Tracking UID, which the SR's measurement group and the presentation
    state's outline share, so that a reader can tell they are the same finding."""

    finding: Finding
    uid: str


def findings(mask: np.ndarray) -> list[Finding]:
    """The regions of a (H, W) mask (nonzero: lesion), the largest first, at most MAX_FINDINGS
    of at least MIN_FINDING_PIXELS pixels."""
    mask = np.asarray(mask) > 0
    regions = [(sum(end - start for _, start, end in runs), runs) for runs in _components(mask)]
    regions = [(pixels, runs) for pixels, runs in regions if pixels >= MIN_FINDING_PIXELS]
    # the largest first; among equals the topmost, then the leftmost
    regions.sort(key=lambda region: (-region[0], region[1][0][0], region[1][0][1]))
    found = []
    for pixels, runs in regions[:MAX_FINDINGS]:
        rows = [r for r, _, _ in runs]
        top, bottom = min(rows), max(rows) + 1
        left, right = min(s for _, s, _ in runs), max(e for _, _, e in runs)
        region = np.zeros((bottom - top, right - left), dtype=bool)
        for r, start, end in runs:
            region[r - top, start - left : end - left] = True
        outline = _trace(region) + np.array([left, top], dtype=float)
        found.append(Finding(pixels, outline, (left, top, right - left, bottom - top)))
    return found


def _components(mask: np.ndarray) -> list[list[tuple[int, int, int]]]:
    """8-connected regions as lists of (row, start column, end column) runs, each list in
    raster order: union-find on the runs, each row's runs merged with the row above's in one
    pass (both are sorted by column)."""
    padded = np.pad(mask.view(np.int8), ((0, 0), (1, 1)))
    rows, columns = np.nonzero(np.diff(padded, axis=1))
    # per row, edges alternate: start of a run, its end (the padding closes every run)
    runs = list(zip(rows[::2].tolist(), columns[::2].tolist(), columns[1::2].tolist(), strict=True))
    parent = list(range(len(runs)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_of_row: dict[int, int] = {}
    for i, (r, _, _) in enumerate(runs):
        first_of_row.setdefault(r, i)
    for r, first in first_of_row.items():
        if r - 1 not in first_of_row:
            continue
        j, i = first_of_row[r - 1], first
        while i < len(runs) and runs[i][0] == r and j < first:
            _, start, end = runs[i]
            _, above_start, above_end = runs[j]
            # 8-connected: overlapping columns, or touching at a corner
            if above_start <= end and above_end >= start:
                parent[root(i)] = root(j)
            if above_end < end:
                j += 1
            else:
                i += 1
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
