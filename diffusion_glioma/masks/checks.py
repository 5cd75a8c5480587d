"""Plausibility checks for a tumour layout. Each returns the name of the failed check, or None.

All work in the common label scheme on the mask's own grid; the reference numbers (volume range,
how exposed the core is in the inputs) come from the input masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..labels import BACKGROUND, BRATS_REGIONS, HEAD, TUMOUR_LABELS

WT = list(BRATS_REGIONS["WT"])
TC = list(BRATS_REGIONS["TC"])


@dataclass(frozen=True)
class CheckSettings:
    min_fragment_voxels: int = 8  # connected tumour pieces smaller than this are strays
    volume_range_ml: tuple[float, float] = (0.0, float("inf"))  # whole-tumour volume allowed
    core_exposure_margin: float = 0.25  # how much more of the core's surface may touch healthy tissue
    contact_margin: float = 0.15  # how much more of a layer's surface may touch a label it barely touched


def remove_fragments(labels: np.ndarray, min_voxels: int) -> np.ndarray:
    """Drop tumour pieces smaller than `min_voxels` (they become head)."""
    tumour = np.isin(labels, TUMOUR_LABELS)
    pieces, count = ndimage.label(tumour)
    if count <= 1:
        return labels
    sizes = np.bincount(pieces.ravel())
    small = np.isin(pieces, np.flatnonzero(sizes < min_voxels)) & tumour
    out = labels.copy()
    out[small] = HEAD
    return out


def core_exposure(labels: np.ndarray) -> float:
    """Fraction of the tumour core's surface that touches non-tumour head tissue directly
    (0 when oedema wraps the core, as in glioblastoma; higher in little-oedema pediatric tumours)."""
    core = np.isin(labels, TC)
    if not core.any():
        return 0.0
    surface = core & ~ndimage.binary_erosion(core)
    touches_head = ndimage.binary_dilation(labels == HEAD) & surface
    return float(touches_head.sum() / max(surface.sum(), 1))


def layer_contacts(labels: np.ndarray) -> dict[tuple[int, int], float]:
    """For each tumour label L and each label M it touches: the fraction of L's face contacts with
    other labels that are with M. A ring tumour's necrosis touches only its enhancing rim (1.0)."""
    counts: dict[tuple[int, int], int] = {}
    for axis in range(labels.ndim):
        a = np.moveaxis(labels, axis, 0)
        lo, hi = a[:-1].ravel(), a[1:].ravel()
        differ = lo != hi
        pairs = np.stack([lo[differ], hi[differ]], axis=1).astype(np.int64)
        pairs = np.concatenate([pairs, pairs[:, ::-1]])
        keys, n = np.unique(pairs, axis=0, return_counts=True)
        for (x, y), c in zip(keys.tolist(), n.tolist()):
            counts[(x, y)] = counts.get((x, y), 0) + c
    totals: dict[int, int] = {}
    for (x, _), c in counts.items():
        totals[x] = totals.get(x, 0) + c
    return {(x, y): c / totals[x] for (x, y), c in counts.items() if x in TUMOUR_LABELS}


def broken_layers(labels: np.ndarray, reference: dict[tuple[int, int], float], margin: float) -> list[tuple[int, int]]:
    """Label pairs whose contact grew by more than `margin` over the source's: necrosis against
    oedema or healthy tissue where the source had a rim, a shell of core outside the rim."""
    current = layer_contacts(labels)
    tumour_pairs = [(x, y) for x, y in current if y in TUMOUR_LABELS or y == HEAD]
    return [pair for pair in tumour_pairs if current[pair] > reference.get(pair, 0.0) + margin]


def check_layout(labels: np.ndarray, head: np.ndarray, allowed_labels: set[int], voxel_ml: float,
                 reference_exposure: float, settings: CheckSettings,
                 reference_contacts: dict[tuple[int, int], float] | None = None) -> str | None:
    """The first failed check's name, or None when the layout is plausible."""
    tumour = np.isin(labels, TUMOUR_LABELS)
    if not tumour.any():
        return "no tumour"
    if (tumour & ~head).any():
        return "outside head"
    border = np.zeros(labels.shape, dtype=bool)
    border[[0, -1]] = border[:, [0, -1]] = border[:, :, [0, -1]] = True
    if (tumour & border).any():
        return "touches volume edge"
    present = set(np.unique(labels).tolist())
    if not present <= allowed_labels | {BACKGROUND, HEAD}:
        return "labels outside input set"
    pieces, count = ndimage.label(tumour)
    if count > 1 and np.bincount(pieces.ravel())[1:].min() < settings.min_fragment_voxels:
        return "stray fragments"
    volume = float(np.isin(labels, WT).sum() * voxel_ml)
    low, high = settings.volume_range_ml
    if not low <= volume <= high:
        return "volume out of range"
    if core_exposure(labels) > reference_exposure + settings.core_exposure_margin:
        return "nesting broken"
    if reference_contacts is not None and broken_layers(labels, reference_contacts, settings.contact_margin):
        return "layer order broken"
    return None
