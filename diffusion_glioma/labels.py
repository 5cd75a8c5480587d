"""The common label scheme and one explicit mapping table per source.

The common scheme is the conditioning vocabulary of every model in this package. A source's
label map is translated through its table; a value missing from the table is an error that
names the file and the values found, never silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError

BACKGROUND, HEAD, CORE, OEDEMA, ENHANCING, CAVITY, CYST = range(7)

COMMON_LABELS: dict[int, str] = {
    BACKGROUND: "background",
    HEAD: "head",
    CORE: "necrosis / non-enhancing tumour core",
    OEDEMA: "oedema / SNFH",
    ENHANCING: "enhancing tumour",
    CAVITY: "resection cavity",
    CYST: "cyst",
}
NUM_COMMON_LABELS = len(COMMON_LABELS)
TUMOUR_LABELS = (CORE, OEDEMA, ENHANCING, CAVITY, CYST)

# BraTS evaluation regions in the common scheme (whole tumour, tumour core, enhancing tumour).
BRATS_REGIONS: dict[str, tuple[int, ...]] = {
    "WT": (CORE, OEDEMA, ENHANCING, CYST),
    "TC": (CORE, ENHANCING, CYST),
    "ET": (ENHANCING,),
}


@dataclass(frozen=True)
class LabelScheme:
    """How one source encodes its segmentation, as a table into the common scheme.

    `has_head` is False for every public source: their 0 means "not tumour", inside or outside the
    head, so the head label is derived from the image foreground (see `derive_head`).
    """

    name: str
    mapping: dict[int, int]
    names: dict[int, str] = field(default_factory=dict)
    has_head: bool = False
    hint: str = ""  # what to say when a file holds values outside the table (another release's scheme?)

    def to_common(self, labels: np.ndarray, path: Path | str | None = None) -> np.ndarray:
        found = np.unique(labels)
        unknown = [int(v) for v in found if int(v) not in self.mapping]
        if unknown:
            where = f"{path}: " if path is not None else ""
            raise DataError(
                f"{where}label values {unknown} are not in the {self.name} scheme "
                f"(known: {sorted(self.mapping)}; found: {[int(v) for v in found]}){self.hint}"
            )
        lut = np.zeros(max(self.mapping) + 1, dtype=np.uint8)
        for source_value, common_value in self.mapping.items():
            lut[source_value] = common_value
        return lut[labels.astype(np.int64)]

    def from_common(self, labels: np.ndarray) -> np.ndarray:
        """Back to the source's values (head becomes 0 when the source has no head label)."""
        inverse: dict[int, int] = {}
        for source_value, common_value in self.mapping.items():  # the first source value of a common one
            if common_value != BACKGROUND or source_value == 0:
                inverse.setdefault(common_value, source_value)
        if not self.has_head:
            inverse[HEAD] = 0
        out = np.zeros(labels.shape, dtype=np.int16)
        for common_value in np.unique(labels):
            if int(common_value) not in inverse:
                raise DataError(
                    f"common label {int(common_value)} ({COMMON_LABELS.get(int(common_value), '?')}) "
                    f"has no value in the {self.name} scheme"
                )
            out[labels == common_value] = inverse[int(common_value)]
        return out


def _scheme(name: str, mapping: dict[int, int], names: dict[int, str], has_head: bool = False,
            hint: str = "") -> LabelScheme:
    return LabelScheme(name, {0: BACKGROUND, **mapping}, {0: "background", **names}, has_head, hint)


SCHEMES: dict[str, LabelScheme] = {
    s.name: s
    for s in [
        # BraTS 2021 and earlier: 1 NCR/NET, 2 ED, 4 ET (3 unused). UPENN-GBM and UCSF-PDGM use it too.
        _scheme("brats2021", {1: CORE, 2: OEDEMA, 4: ENHANCING}, {1: "NCR", 2: "ED", 4: "ET"},
                hint="; a label 3 is BraTS 2013-2016's non-enhancing core: if these are such files, say "
                     "--labels brats2013 (or labels: in the data config, or a label_schemes.json in the data folder)"),
        # BraTS 2013-2016 (and many public examples still): 1 necrosis, 2 oedema, 3 non-enhancing core,
        # 4 enhancing; 2017 merged 3 into 1. Values 1, 2 and 4 mean the same as in brats2021.
        _scheme("brats2013", {1: CORE, 2: OEDEMA, 3: CORE, 4: ENHANCING},
                {1: "necrosis", 2: "oedema", 3: "non-enhancing", 4: "enhancing"}),
        # BraTS 2023-24 adult glioma: 1 NETC, 2 SNFH, 3 ET; 2024 adds 4 resection cavity.
        _scheme("brats_gli", {1: CORE, 2: OEDEMA, 3: ENHANCING, 4: CAVITY}, {1: "NETC", 2: "SNFH", 3: "ET", 4: "RC"}),
        # BraTS-PEDs 2024: 1 ET, 2 NET, 3 cystic component, 4 ED.
        _scheme("brats_peds", {1: ENHANCING, 2: CORE, 3: CYST, 4: OEDEMA}, {1: "ET", 2: "NET", 3: "CC", 4: "ED"}),
        # BraTS-PEDs 2023 followed the adult 2023 convention: 1 NCR, 2 ED, 3 ET.
        _scheme("brats_peds_2023", {1: CORE, 2: OEDEMA, 3: ENHANCING}, {1: "NCR", 2: "ED", 3: "ET"}),
        # Med-DDPM's preprocessed BraTS files (its dataset code's label enum): 1 necrosis, 2 oedema,
        # 3 enhancing tumour, 4 brain, so the head comes with the labels.
        _scheme("medddpm", {1: CORE, 2: OEDEMA, 3: ENHANCING, 4: HEAD},
                {1: "necrosis", 2: "oedema", 3: "enhancing", 4: "brain"}, has_head=True),
        # The common scheme itself (label maps this package writes).
        LabelScheme("common", {v: v for v in COMMON_LABELS}, dict(COMMON_LABELS), has_head=True),
    ]
}


SCHEMES["brats_peds_2024"] = SCHEMES["brats_peds"]


class UnstatedPedsScheme(LabelScheme):
    """BraTS-PEDs data whose release nobody stated. 2023 (1 NCR, 2 ED, 3 ET) and 2024 (1 ET, 2 NET,
    3 CC, 4 ED) share file names and values 1-3, so only a label 4 tells them apart; anything else
    stops with one line rather than silently turning necrosis into enhancing tumour."""

    def to_common(self, labels: np.ndarray, path: Path | str | None = None) -> np.ndarray:
        found = {int(v) for v in np.unique(labels)}
        if found - {0} and found <= {0, 1, 2, 3}:  # a tumour, and no label 4 to say 2024
            raise DataError(
                f"{path}: BraTS-PEDs labels {sorted(found)} fit both the 2023 release (1 NCR, 2 ED, 3 ET) and "
                "2024 (1 ET, 2 NET, 3 CC, 4 ED); say which with --labels brats_peds_2023 or --labels "
                "brats_peds_2024 (or labels: in the data config, or a label_schemes.json in the data folder)"
            )
        return SCHEMES["brats_peds_2024"].to_common(labels, path)  # which also names any unknown values


PEDS_UNSTATED = "brats_peds_unstated"
SCHEMES[PEDS_UNSTATED] = UnstatedPedsScheme(PEDS_UNSTATED, SCHEMES["brats_peds"].mapping, SCHEMES["brats_peds"].names)


def get_scheme(spec: str | dict) -> LabelScheme:
    """A scheme by name, or a custom one from a `{source_value: common_value}` table."""
    if isinstance(spec, str):
        if spec not in SCHEMES:
            raise DataError(f"unknown label scheme {spec!r}; choose one of {sorted(SCHEMES)} or give a mapping table")
        return SCHEMES[spec]
    mapping = {int(k): int(v) for k, v in spec.items()}
    bad = sorted(v for v in mapping.values() if v not in COMMON_LABELS)
    if bad:
        raise DataError(f"label mapping targets {bad} are not common labels {sorted(COMMON_LABELS)}")
    mapping.setdefault(0, BACKGROUND)
    return LabelScheme("custom", mapping, {}, has_head=HEAD in mapping.values())


def add_head(common: np.ndarray, head: np.ndarray) -> np.ndarray:
    """Mark non-tumour voxels inside `head` as HEAD; tumour voxels count as head whatever `head` says."""
    out = common.copy()
    out[(out == BACKGROUND) & head] = HEAD
    return out


def label_volumes_ml(common: np.ndarray, voxel_volume_mm3: float) -> dict[str, float]:
    """Volume per common label in millilitres (for listings and checks)."""
    counts = np.bincount(common.ravel().astype(np.int64), minlength=NUM_COMMON_LABELS)
    return {COMMON_LABELS[i]: float(counts[i] * voxel_volume_mm3 / 1000.0) for i in COMMON_LABELS}
