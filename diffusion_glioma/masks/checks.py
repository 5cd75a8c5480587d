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


def check_layout(labels: np.ndarray, head: np.ndarray, allowed_labels: set[int], voxel_ml: float,
                 reference_exposure: float, settings: CheckSettings) -> str | None:
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
    return None
