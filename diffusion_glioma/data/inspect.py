"""`inspect`: a table of a raw dataset's cases, a montage to look at, and every problem found.

It doubles as the dataset check: each case is read and checked exactly as `prepare` would, and each
problem is one line naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..config import DataConfig
from ..errors import DataError
from ..figures import FigureRow, to_ras, write_slices_figure
from ..labels import COMMON_LABELS, HEAD, TUMOUR_LABELS, label_volumes_ml
from .layouts import discover_cases
from .preprocess import LoadedCase, load_case


@dataclass
class CaseRow:
    case_id: str
    layout: str
    disease: str
    modalities: list[str]
    shape: tuple[int, ...] | None = None
    spacing: tuple[float, ...] | None = None
    volumes_ml: dict[str, float] = field(default_factory=dict)  # common label name -> mL
    has_seg: bool = False


@dataclass
class InspectReport:
    rows: list[CaseRow]
    problems: list[str]

    def table(self) -> str:
        tumour_names = [COMMON_LABELS[i] for i in TUMOUR_LABELS]
        short = {name: name.split(" ")[0].split("/")[0] for name in tumour_names}
        header = ["case", "layout", "disease", "modalities", "shape", "spacing mm", "head mL"] + [
            f"{short[n]} mL" for n in tumour_names]
        lines = [header]
        for r in self.rows:
            lines.append([
                r.case_id, r.layout, r.disease, ",".join(r.modalities),
                "x".join(map(str, r.shape)) if r.shape else "-",
                "x".join(f"{s:g}" for s in r.spacing) if r.spacing else "-",
                f"{r.volumes_ml.get(COMMON_LABELS[HEAD], 0.0):.0f}" if r.volumes_ml else "-",
                *([f"{r.volumes_ml.get(n, 0.0):.1f}" for n in tumour_names] if r.has_seg else ["-"] * len(tumour_names)),
            ])
        widths = [max(len(str(row[i])) for row in lines) for i in range(len(header))]
        return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in lines)


def inspect_dataset(root: str | Path, config: DataConfig, *, montage: str | Path | None = None,
                    montage_cases: int = 12, progress: bool = True) -> InspectReport:
    """Check every case under `root`; optionally write a PNG montage of the first cases."""
    cases = discover_cases(root, config.layout, labels=config.labels, disease=config.disease)
    rows, problems, shown = [], [], []
    for case in tqdm(cases, desc="inspect", unit="case", disable=not progress):
        row = CaseRow(case.case_id, case.layout, case.disease, sorted(case.images), has_seg=case.seg is not None)
        rows.append(row)
        try:
            loaded = load_case(case, config.preprocess)
        except DataError as exc:
            problems.append(str(exc))
            continue
        reference = next(iter(loaded.images.values()))
        row.shape, row.spacing = reference.shape, tuple(round(s, 3) for s in reference.spacing)
        labels = loaded.labels if loaded.labels is not None else loaded.head.astype(np.uint8)
        row.volumes_ml = label_volumes_ml(labels, abs(np.linalg.det(reference.affine[:3, :3])))
        if len(shown) < montage_cases:
            shown.append(loaded)
    if montage is not None and shown:
        write_montage(montage, shown, config.preprocess.modalities)
    return InspectReport(rows, problems)


def write_montage(path: str | Path, cases: list[LoadedCase], modalities: tuple[str, ...]) -> Path:
    """Axial slices through each tumour's centre (RAS display), one row per case, mask overlaid."""
    rows = []
    for loaded in cases:
        affine = next(iter(loaded.images.values())).affine
        labels = loaded.labels if loaded.labels is not None else loaded.head.astype(np.uint8)
        rows.append(FigureRow(loaded.case.case_id, {m: to_ras(loaded.images[m].array, affine) for m in modalities},
                              to_ras(labels, affine)))
    return write_slices_figure(path, rows, modalities)
