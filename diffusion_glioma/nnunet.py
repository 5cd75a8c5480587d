"""nnU-Net's raw dataset format, in one place: label values, the region definition of dataset.json.

nnU-Net wants consecutive label values. They are ordered outside-in so that painting the BraTS
regions in `regions_class_order` (whole tumour, then core, then enhancing) rebuilds the labels, as
nnU-Net's own BraTS datasets are trained (region-based)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .io import write_json
from .labels import BRATS_REGIONS, CAVITY, COMMON_LABELS, CORE, CYST, ENHANCING, OEDEMA

ORDER = (OEDEMA, CORE, ENHANCING, CYST, CAVITY)
# In the order nnU-Net paints them; each region's first value is the label it paints, so every label
# needs a region that starts with it (a cyst inside the core would otherwise come back as core).
# Written in this order (dict order is file order; nnU-Net reads regions in file order).
REGION_NAMES = {"whole_tumor": BRATS_REGIONS["WT"], "tumor_core": BRATS_REGIONS["TC"],
                "enhancing_tumor": BRATS_REGIONS["ET"], "cyst": (CYST,), "resection_cavity": (CAVITY,)}


def label_values(tumour_labels) -> dict[int, int]:
    """{common label: nnU-Net value} for the tumour labels present, consecutive from 1."""
    present = [c for c in ORDER if c in set(tumour_labels)]
    return {common: i + 1 for i, common in enumerate(present)}


def to_nnunet(common: np.ndarray, values: dict[int, int]) -> np.ndarray:
    out = np.zeros(common.shape, dtype=np.int16)
    for label, value in values.items():
        out[common == label] = value
    return out


def to_common(nnunet: np.ndarray, values: dict[int, int]) -> np.ndarray:
    out = np.zeros(nnunet.shape, dtype=np.uint8)
    for label, value in values.items():
        out[nnunet == value] = label
    return out


def write_dataset_json(root: Path, modalities, values: dict[int, int], num_training: int, name: str,
                       description: str) -> Path:
    regions: dict[str, int | list[int]] = {"background": 0}
    order = []
    for region, members in REGION_NAMES.items():
        chosen = sorted(values[c] for c in members if c in values)
        if chosen:
            regions[region] = chosen if len(chosen) > 1 else chosen[0]
            order.append(chosen[0])
    return write_json(root / "dataset.json", {
        "channel_names": {str(c): m for c, m in enumerate(modalities)},
        "labels": regions,
        "regions_class_order": order,
        "numTraining": num_training,
        "file_ending": ".nii.gz",
        "name": name,
        "description": f"{description}; label values: "
                       + ", ".join(f"{v} = {COMMON_LABELS[c]}" for c, v in values.items()),
    })
