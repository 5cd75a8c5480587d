"""NIfTI reading with validation, and atomic writes.

Every reader check raises :class:`DataError` whose message starts with the file's path, so a
user sees which file is wrong and why in one line, never a traceback from inside nibabel.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np

from .errors import DataError, first_line

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def nifti_stem(path: Path) -> str:
    """`case_t1.nii.gz` -> `case_t1`."""
    for suffix in NIFTI_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


@dataclass
class Volume:
    """A 3D array with the geometry it lives on: voxels and affine never travel apart."""

    array: np.ndarray
    affine: np.ndarray
    path: Path | None = None
    qform_code: int = 1
    sform_code: int = 1

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]


def load_volume(path: str | Path, *, kind: str = "image") -> Volume:
    """Read a 3D NIfTI and check it.

    `kind` is "image" (float, must not be constant) or "label" (integer values, may be all zero).
    A trailing singleton 4th dimension is dropped; any other 4D image is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for a bad header
        raise DataError(f"{path}: not a readable NIfTI file ({first_line(exc, 200)})") from None
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise DataError(f"{path}: {len(img.shape)}D image of shape {tuple(img.shape)} where a 3D volume is expected")
    try:
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    except Exception as exc:  # truncated or corrupt payload: EOFError, zlib.error, ValueError ...
        raise DataError(f"{path}: cannot read voxel data, file is truncated or corrupt ({first_line(exc, 200)})") from None
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise DataError(f"{path}: {bad} voxels are NaN or Inf")
    if kind == "image":
        if data.max() == data.min():
            raise DataError(f"{path}: image is empty (every voxel is {data.flat[0]:g})")
    elif kind == "label":
        rounded = np.rint(data)
        if np.abs(data - rounded).max() > 1e-3:
            raise DataError(f"{path}: label map holds non-integer values (is this an image, not a segmentation?)")
        data = rounded.astype(np.int16)
    else:
        raise ValueError(f"kind must be 'image' or 'label', got {kind!r}")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-8:
        raise DataError(f"{path}: affine is singular or not finite")
    header = img.header
    qcode = int(header["qform_code"]) if "qform_code" in header else 1
    scode = int(header["sform_code"]) if "sform_code" in header else 1
    return Volume(data, affine, path, qform_code=qcode or 1, sform_code=scode or 1)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; rename it onto `path` only if the block succeeds.

    The temporary name keeps the suffixes (nibabel picks compression from them) and starts with
    a dot, so a half-written file is never visible under its final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    base = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    tmp = path.with_name(f".{base}.tmp{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def chmod_like_open(path: str | Path) -> None:
    """Give a weights file (or every .safetensors file under a folder) the mode a plain `open()` gives:
    0666 less the umask. safetensors 0.8 writes through a private temporary file and leaves 0600, so a
    lab's group could not read weights one member trained (safetensors/safetensors#782)."""
    path, mode = Path(path), 0o666 & ~_umask()
    for file in (sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]):
        os.chmod(file, mode)


def _umask() -> int:
    """The process's umask, read where Linux shows it; elsewhere set and put back (which changes it for
    other threads for an instant)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> Path:
    """Write a text file atomically (a temporary sibling, then a rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")  # reports carry ±, ² and −, whatever the locale
    return Path(path)


def save_volume(path: str | Path, array: np.ndarray, affine: np.ndarray, *, qform_code: int = 1,
                sform_code: int = 1, dtype=np.float32) -> Path:
    """Write a NIfTI atomically with the given affine and qform/sform codes."""
    img = nib.Nifti1Image(np.asarray(array, dtype=dtype), affine)
    img.set_qform(affine, code=int(qform_code))
    img.set_sform(affine, code=int(sform_code))
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


# What `atomic_path` names its temporaries: a leftover of a killed run, never a finished file.
_TEMPORARY = re.compile(r"^\..+\.tmp\d+(\.[A-Za-z0-9]+)*$")


def _libc_malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def return_freed_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim; a no-op elsewhere).

    A stream of volumes allocates and frees arrays of many sizes; past the first large free, glibc
    serves them from the heap, where the small objects kept between volumes pin the free space, so
    the resident memory of a long stream grows with its length though nothing more is kept
    (docs/benchmarks.md, "Evaluation at BraTS counts"). Call it every few volumes."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def is_temporary(path: Path) -> bool:
    return _TEMPORARY.match(Path(path).name) is not None


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete the temporaries a killed writer left under `folder` (only safe when no writer is running)."""
    removed = 0
    for path in Path(folder).rglob(".*"):
        if path.is_file() and is_temporary(path):
            path.unlink()
            removed += 1
    return removed


def write_json(path: str | Path, obj, *, sort_keys: bool = False) -> Path:
    """Write JSON atomically with readable indentation. Keys stay in the order given, because some
    readers give it meaning (nnU-Net reads its regions in file order)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=sort_keys, default=_json_default) + "\n")
    return Path(path)


_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_id(value, where: str) -> str:
    """An id that becomes a file name: letters, digits, '.', '_', '-', no path separators."""
    if not isinstance(value, str) or not _SAFE_ID.fullmatch(value) or ".." in value:
        raise DataError(f"{where}: id {value!r} is not a plain name (letters, digits, '.', '_', '-')")
    return value


def inside(folder: str | Path, relative, where: str) -> Path:
    """`folder / relative`, refusing absolute paths and any path that leaves `folder` (`..`, links)."""
    folder = Path(folder)
    if not isinstance(relative, str) or not relative or Path(relative).is_absolute():
        raise DataError(f"{where}: path {relative!r} must be relative to {folder}")
    path = folder / relative
    if not path.resolve().is_relative_to(folder.resolve()):
        raise DataError(f"{where}: path {relative!r} leaves {folder}")
    return path


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
