"""PNG figures a person looks at: rows of axial slices, every modality beside the mask.

Used by `inspect` (raw cases), training validation (samples on the model grid) and `generate`
(a few written outputs; two draws of each mask side by side when it writes several). Arrays are
given in RAS voxel order; the slice goes through the tumour.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .io import atomic_path
from .labels import COMMON_LABELS, TUMOUR_LABELS

# One colour per common label; background and head stay clear in the overlay.
LABEL_COLOURS = {2: (1.0, 0.2, 0.2), 3: (0.2, 0.9, 0.2), 4: (1.0, 0.9, 0.1), 5: (0.3, 0.5, 1.0), 6: (0.9, 0.3, 1.0)}


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display on clusters and CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | Path, dpi: int = 80) -> Path:
    """Write a figure atomically and free it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    pyplot().close(fig)
    return path


@dataclass
class FigureRow:
    name: str
    images: dict[str, np.ndarray]  # modality -> 3D array (RAS voxel order)
    labels: np.ndarray  # 3D, common scheme
    value_range: tuple[float, float] | None = None  # None: each slice's 1st-99.5th percentile


def tumour_slice(labels: np.ndarray) -> int:
    """The axial index through the tumour's centre (the middle slice when there is no tumour)."""
    tumour = np.isin(labels, TUMOUR_LABELS)
    return int(np.argwhere(tumour)[:, 2].mean()) if tumour.any() else labels.shape[2] // 2


def axial_row(row: FigureRow) -> FigureRow:
    """The row cut down to its one displayed slice (what a figure keeps in memory while a job runs)."""
    z = tumour_slice(row.labels)
    return FigureRow(row.name, {m: a[:, :, z:z + 1] for m, a in row.images.items()}, row.labels[:, :, z:z + 1],
                     row.value_range)


def write_draws_figure(path: str | Path, pairs: list[tuple[FigureRow, FigureRow]],
                       modalities: list[str] | tuple[str, ...], title: str = "") -> Path:
    """Two draws of each mask side by side, per modality, beside the mask: what varies between them is
    what the model samples; what stays is what the mask fixes."""
    plt = pyplot()
    columns = 2 * len(modalities) + 1
    fig, axes = plt.subplots(len(pairs), columns, figsize=(1.7 * columns, 1.9 * len(pairs) + 0.5), squeeze=False)
    for r, (first, second) in enumerate(pairs):
        z = tumour_slice(first.labels)
        for c, modality in enumerate(modalities):
            for d, draw in enumerate((first, second)):
                _image_panel(axes[r, 2 * c + d], draw, modality, z, f"{modality} draw {d + 1}" if r == 0 else None, 8)
        _mask_panel(axes[r], first, modalities, z, r == 0, 8)
    return _legend_and_save(fig, path, title, ncol=5)


def write_slices_figure(path: str | Path, rows: list[FigureRow], modalities: list[str] | tuple[str, ...],
                        title: str = "") -> Path:
    plt = pyplot()
    columns = len(modalities) + 1
    fig, axes = plt.subplots(len(rows), columns, figsize=(2.1 * columns, 2.2 * len(rows) + 0.4), squeeze=False)
    for r, row in enumerate(rows):
        z = tumour_slice(row.labels)
        for c, modality in enumerate(modalities):
            _image_panel(axes[r, c], row, modality, z, modality if r == 0 else None, 9)
        _mask_panel(axes[r], row, modalities, z, r == 0, 9)
    return _legend_and_save(fig, path, title, ncol=3)


def _image_panel(ax, row: FigureRow, modality: str, z: int, title: str | None, fontsize: int) -> None:
    image = row.images[modality][:, :, z].T
    low, high = row.value_range or (np.percentile(image, 1), np.percentile(image, 99.5))
    ax.imshow(image, cmap="gray", origin="lower", vmin=low, vmax=high)
    if title:
        ax.set_title(title, fontsize=fontsize)


def _mask_panel(axes_row, row: FigureRow, modalities, z: int, titled: bool, fontsize: int) -> None:
    """The last column: the labels over the last modality; then the row's name and no ticks."""
    overlay = np.zeros((*row.labels.shape[:2], 4))
    for value, colour in LABEL_COLOURS.items():
        overlay[row.labels[:, :, z] == value] = (*colour, 0.65)
    low, high = row.value_range or (None, None)
    axes_row[-1].imshow(row.images[modalities[-1]][:, :, z].T, cmap="gray", origin="lower", vmin=low, vmax=high)
    axes_row[-1].imshow(overlay.transpose(1, 0, 2), origin="lower")
    if titled:
        axes_row[-1].set_title("mask", fontsize=fontsize)
    axes_row[0].set_ylabel(row.name, fontsize=7)
    for ax in axes_row:
        ax.set_xticks([])
        ax.set_yticks([])


def _legend_and_save(fig, path: str | Path, title: str, ncol: int) -> Path:
    plt = pyplot()
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in LABEL_COLOURS.values()]
    fig.legend(handles, [COMMON_LABELS[v] for v in LABEL_COLOURS], loc="lower center", ncol=ncol, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return save_png(fig, path, dpi=90)


def to_ras(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Reorder a volume's voxel axes to the closest RAS order (for display)."""
    import nibabel as nib

    return nib.orientations.apply_orientation(array, nib.orientations.io_orientation(affine))
