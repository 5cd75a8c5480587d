"""From a raw case to model-space arrays, and back.

The whole geometric path (reorient to RAS, centre on the head, crop or pad, resample) is one affine
map from model voxels to source voxels, kept in a :class:`GeometryRecord`. Applying it is a single
interpolation, and writing a model-space array back onto the source grid is the same call with the
inverse map: no chain of transforms to undo, no error that accumulates, and the exact source affine
and header codes on the way out.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from ..config import PreprocessConfig
from ..errors import DataError
from ..io import Volume, load_volume, save_volume
from ..labels import BACKGROUND, TUMOUR_LABELS, add_head, get_scheme
from .layouts import Case


@dataclass(frozen=True)
class GeometryRecord:
    """Where a model-space array sits on its source grid.

    `model_to_source` maps model voxel indices to source voxel indices (homogeneous 4x4), so the
    model array's own affine is `source_affine @ model_to_source`.
    """

    source_shape: tuple[int, int, int]
    source_affine: tuple[tuple[float, ...], ...]
    model_shape: tuple[int, int, int]
    model_to_source: tuple[tuple[float, ...], ...]
    qform_code: int = 1
    sform_code: int = 1

    @property
    def matrix(self) -> np.ndarray:
        return np.asarray(self.model_to_source, dtype=np.float64)

    @property
    def source_affine_array(self) -> np.ndarray:
        return np.asarray(self.source_affine, dtype=np.float64)

    @property
    def model_affine(self) -> np.ndarray:
        return self.source_affine_array @ self.matrix

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "GeometryRecord":
        d = json.loads(text)
        return cls(
            tuple(d["source_shape"]), tuple(tuple(r) for r in d["source_affine"]), tuple(d["model_shape"]),
            tuple(tuple(r) for r in d["model_to_source"]), int(d["qform_code"]), int(d["sform_code"]),
        )


def plan_geometry(affine: np.ndarray, shape: tuple[int, ...], head: np.ndarray,
                  model_shape: tuple[int, int, int], spacing: tuple[float, float, float],
                  qform_code: int = 1, sform_code: int = 1) -> GeometryRecord:
    """The model grid: RAS-ordered axes, `spacing` mm voxels, centred on the head's bounding box."""
    # Canonical (closest RAS) voxel order: a permutation and flips only, so nothing is resampled here.
    orientation = nib.orientations.io_orientation(affine)
    canonical_to_source = nib.orientations.inv_ornt_aff(orientation, shape)
    canonical_affine = affine @ canonical_to_source
    canonical_spacing = np.sqrt((canonical_affine[:3, :3] ** 2).sum(axis=0))

    if not head.any():
        raise DataError("no head found (every voxel looks like background)")
    idx = np.argwhere(head)
    corners = np.array([[a, b, c, 1.0] for a in (idx[:, 0].min(), idx[:, 0].max())
                        for b in (idx[:, 1].min(), idx[:, 1].max()) for c in (idx[:, 2].min(), idx[:, 2].max())])
    corners_canonical = (np.linalg.inv(canonical_to_source) @ corners.T)[:3]
    centre = (corners_canonical.min(axis=1) + corners_canonical.max(axis=1)) / 2

    step = np.asarray(spacing, dtype=float) / canonical_spacing  # canonical voxels per model voxel
    start = centre - (np.asarray(model_shape) - 1) / 2 * step
    # Whole-voxel start: at the source spacing the model grid then falls on source voxels exactly.
    start = np.round(start)
    model_to_canonical = np.eye(4)
    model_to_canonical[:3, :3] = np.diag(step)
    model_to_canonical[:3, 3] = start
    matrix = canonical_to_source @ model_to_canonical
    as_tuple = lambda m: tuple(tuple(float(v) for v in row) for row in m)  # noqa: E731
    return GeometryRecord(tuple(int(s) for s in shape[:3]), as_tuple(affine), tuple(int(s) for s in model_shape),
                          as_tuple(matrix), qform_code, sform_code)


def to_model(array: np.ndarray, record: GeometryRecord, *, label: bool = False, fill: float = 0.0) -> np.ndarray:
    """Resample a source-grid array onto the model grid (linear, or nearest for labels)."""
    matrix = record.matrix
    if not label:
        # Anti-alias before downsampling: a Gaussian of (factor - 1) / 2 source voxels, as scikit-image does.
        factors = np.abs(matrix[:3, :3]).max(axis=1)
        sigma = np.maximum(0.0, (factors - 1.0) / 2.0)
        if sigma.max() > 0:
            array = ndimage.gaussian_filter(array.astype(np.float32), sigma, mode="nearest")
    return ndimage.affine_transform(
        array, matrix[:3, :3], matrix[:3, 3], output_shape=record.model_shape,
        order=0 if label else 1, mode="constant", cval=fill,
    )


def to_source(array: np.ndarray, record: GeometryRecord, *, label: bool = False, fill: float = 0.0) -> np.ndarray:
    """Resample a model-space array back onto its source grid (the inverse of `to_model`)."""
    if tuple(array.shape) != tuple(record.model_shape):
        raise DataError(f"array of shape {array.shape} does not match the model grid {record.model_shape}")
    inverse = np.linalg.inv(record.matrix)
    return ndimage.affine_transform(
        array, inverse[:3, :3], inverse[:3, 3], output_shape=record.source_shape,
        order=0 if label else 1, mode="constant", cval=fill,
    )


def write_on_source(path: str | Path, array: np.ndarray, record: GeometryRecord, *, label: bool = False) -> Path:
    """Write a model-space array as a NIfTI on the exact source grid, affine and header codes."""
    data = to_source(array, record, label=label)
    dtype = np.int16 if label else np.float32
    return save_volume(path, data, record.source_affine_array, qform_code=record.qform_code,
                       sform_code=record.sform_code, dtype=dtype)


def background_value(array: np.ndarray) -> float:
    """The value of the volume's faces: 0 for BraTS, -1 for Med-DDPM's pre-scaled images, noise elsewhere."""
    faces = np.concatenate([array[[0, -1]].ravel(), array[:, [0, -1]].ravel(), array[:, :, [0, -1]].ravel()])
    return float(np.median(faces))


def find_head(images: list[np.ndarray], fraction: float) -> np.ndarray:
    """Head mask from the images, whatever their background value: a voxel belongs to the head when it
    differs from the background by more than `fraction` of the robust maximum difference in any
    modality; holes are filled and only the largest connected piece is kept."""
    mask = np.zeros(images[0].shape, dtype=bool)
    for image in images:
        distance = np.abs(image - background_value(image))
        scale = np.percentile(distance, 99.5)
        if scale > 0:
            mask |= distance > fraction * scale
    mask = ndimage.binary_opening(mask, iterations=1)
    components, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    mask = components == sizes.argmax()
    return ndimage.binary_fill_holes(ndimage.binary_closing(mask, iterations=2))


def normalise(image: np.ndarray, head: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """Clip to percentiles inside the head and scale to [-1, 1]; background is -1."""
    values = image[head]
    low, high = np.percentile(values, percentiles)
    if high <= low:
        high = low + 1e-6
    out = np.clip((image - low) / (high - low), 0.0, 1.0) * 2.0 - 1.0
    out[~head] = -1.0
    return out.astype(np.float32)


@dataclass
class LoadedCase:
    """A raw case read, checked and put in the common label scheme, still on its source grid."""

    case: Case
    images: dict[str, Volume]
    labels: np.ndarray | None  # common scheme, head included
    head: np.ndarray


def load_case(case: Case, config: PreprocessConfig) -> LoadedCase:
    """Read a case's files and check them against each other. Every error names a file."""
    missing = case.missing(config.modalities)
    if missing:
        where = next(iter(case.images.values()), case.seg)
        folder = where.parent if where is not None else case.case_id
        raise DataError(f"{folder}: case {case.case_id} is missing modalities {missing}")
    images = {m: load_volume(case.images[m], kind="image") for m in config.modalities}
    reference = images[config.modalities[0]]
    seg = load_volume(case.seg, kind="label") if case.seg is not None else None
    for volume in [*images.values(), *([seg] if seg is not None else [])]:
        check_same_grid(volume, reference, config.affine_tolerance)
    head = find_head([v.array for v in images.values()], config.foreground_fraction)
    labels = None
    if seg is not None:
        common = get_scheme(case.labels).to_common(seg.array, seg.path)
        labels = add_head(common, head)
        head = labels != BACKGROUND
    return LoadedCase(case, images, labels, head)


def check_same_grid(volume: Volume, reference: Volume, tolerance: float) -> None:
    if volume.shape != reference.shape:
        raise DataError(f"{volume.path}: shape {volume.shape} differs from {reference.path.name} {reference.shape}")
    difference = float(np.abs(volume.affine - reference.affine).max())
    if difference > tolerance:
        raise DataError(f"{volume.path}: affine differs from {reference.path.name} by {difference:.3g} mm "
                        f"(tolerance {tolerance:g}); resample the case onto one grid first")


@dataclass
class PreparedCase:
    """Model-space arrays of one case, plus what is needed to go back."""

    case_id: str
    disease: str
    image: np.ndarray  # (modality, x, y, z) float32 in [-1, 1]
    labels: np.ndarray  # (x, y, z) uint8, common scheme; head only for images-only cases
    has_seg: bool
    geometry: GeometryRecord


def prepare_case(case: Case, config: PreprocessConfig) -> PreparedCase:
    loaded = load_case(case, config)
    reference = loaded.images[config.modalities[0]]
    record = plan_geometry(reference.affine, reference.shape, loaded.head, config.shape, config.spacing,
                           reference.qform_code, reference.sform_code)
    channels = []
    for modality in config.modalities:
        normalised = normalise(loaded.images[modality].array, loaded.head, config.clip_percentiles)
        channels.append(to_model(normalised, record, fill=-1.0))
    labels = loaded.labels if loaded.labels is not None else loaded.head.astype(np.uint8)
    if loaded.labels is not None:
        check_tumour_inside(loaded.labels, record, case)
    model_labels = to_model(labels.astype(np.uint8), record, label=True).astype(np.uint8)
    image = np.stack(channels).astype(np.float32)
    image[:, model_labels == BACKGROUND] = -1.0
    return PreparedCase(case.case_id, case.disease, image, model_labels, loaded.labels is not None, record)


def check_tumour_inside(source_labels: np.ndarray, record: GeometryRecord, case: Case) -> None:
    """The head may be cropped by the model's field of view; the tumour may not."""
    tumour = np.argwhere(np.isin(source_labels, TUMOUR_LABELS))
    if not len(tumour):
        return
    inverse = np.linalg.inv(record.matrix)
    model_coords = tumour @ inverse[:3, :3].T + inverse[:3, 3]
    outside = ((model_coords < -0.5) | (model_coords > np.asarray(record.model_shape) - 0.5)).any(axis=1)
    if outside.any():
        raise DataError(f"{case.seg}: {int(outside.sum())} of {len(tumour)} tumour voxels lie outside the model's "
                        "field of view; enlarge the configured shape or spacing")
