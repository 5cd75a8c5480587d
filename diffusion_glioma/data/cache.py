"""The preprocessed-case cache: a folder that training reads every epoch instead of the raw NIfTIs.

    CACHE/dataset.json            settings, modalities, label scheme, and one entry per case
    CACHE/cases/<case>.safetensors  image (modality, x, y, z) float16 in [-1, 1], labels uint8;
                                    the geometry record and case facts in the file's metadata

Every file is written under a temporary name and renamed, so an interrupted `prepare` leaves only
whole cases behind, and running it again carries on where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .. import __version__
from ..config import DataConfig
from ..errors import DataError
from ..io import atomic_path, chmod_like_open, write_json
from ..labels import COMMON_LABELS
from .layouts import discover_cases
from .preprocess import GeometryRecord, PreparedCase, prepare_case

INDEX = "dataset.json"


def settings_hash(config: DataConfig) -> str:
    """Fingerprint of everything that changes the cached arrays."""
    text = json.dumps(config.preprocess.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class PrepareSummary:
    prepared: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # case id -> reason

    def lines(self) -> list[str]:
        out = [f"prepared {len(self.prepared)}, already cached {len(self.reused)}, skipped {len(self.skipped)}"]
        out += [f"  skipped {cid}: {reason}" for cid, reason in self.skipped.items()]
        return out


def prepare_dataset(raw: str | Path, cache: str | Path, config: DataConfig, *, skip_bad: bool = False,
                    limit: int | None = None, overwrite: bool = False, progress: bool = True,
                    workers: int | None = None) -> PrepareSummary:
    """Preprocess every case of `raw` into `cache`. A bad case stops the run unless `skip_bad`.

    `workers` processes (default: every core) prepare cases in parallel; each case is written once,
    atomically, by the process that prepared it, and the index is updated by this one as cases finish.
    """
    cache = Path(cache)
    cases = discover_cases(raw, config.layout, labels=config.labels, disease=config.disease)
    if limit is not None:
        cases = cases[:limit]
    fingerprint = settings_hash(config)
    index_path = cache / INDEX
    entries: dict[str, dict] = {}
    if index_path.is_file():
        index = read_index(cache)
        if index["settings_hash"] != fingerprint and not overwrite:
            raise DataError(f"{index_path}: this cache was made with other preprocessing settings; "
                            "choose a new cache folder or pass --overwrite")
        if index["settings_hash"] == fingerprint:
            entries = {e["case_id"]: e for e in index["cases"]}
    (cache / "cases").mkdir(parents=True, exist_ok=True)
    summary = PrepareSummary()
    todo = []
    for case in cases:
        if case.case_id in entries and case_path(cache, case.case_id).is_file() and not overwrite:
            summary.reused.append(case.case_id)
        else:
            todo.append(case)
    workers = min(workers or os.cpu_count() or 1, max(len(todo), 1))
    bar = tqdm(total=len(cases), initial=len(summary.reused), desc="prepare", unit="case", disable=not progress)
    failure = threading.Event()
    first_error = None
    for case, entry, error in _prepared(todo, config.preprocess, cache, workers, failure):
        bar.update(1)
        if error is not None:
            if not skip_bad:  # stop starting cases, but keep the ones already running when they finish
                first_error = first_error or error
                failure.set()
                continue
            summary.skipped[case.case_id] = error
            entries.pop(case.case_id, None)
            continue
        entries[case.case_id] = entry
        summary.prepared.append(case.case_id)
        # Rewritten after each case so that an interrupted run still knows what it holds.
        _write_index(cache, config, fingerprint, entries)
    bar.close()
    _write_index(cache, config, fingerprint, entries)
    if first_error is not None:
        raise DataError(first_error)
    return summary


def _prepare_and_write(case, preprocess, target: Path) -> tuple[dict | None, str | None]:
    """One case, in a worker process: (index entry, None), or (None, the one-line reason it failed)."""
    try:
        prepared = prepare_case(case, preprocess)
    except DataError as exc:
        return None, str(exc)
    write_case(target, prepared, source={m: str(p) for m, p in case.images.items()} | (
        {"seg": str(case.seg)} if case.seg else {}))
    return {
        "case_id": case.case_id, "disease": case.disease, "layout": case.layout,
        "has_seg": prepared.has_seg, "label_scheme": case.labels if isinstance(case.labels, str) else "custom",
        "labels_present": sorted(int(v) for v in np.unique(prepared.labels)),
    }, None


def _prepared(cases: list, preprocess, cache: Path, workers: int, stop: threading.Event):
    """(case, entry, error) for each case as it finishes, from `workers` processes; once `stop` is
    set no new case starts, and those already running still come out."""
    if workers <= 1:
        for case in cases:
            if stop.is_set():
                return
            yield case, *_prepare_and_write(case, preprocess, case_path(cache, case.case_id))
        return
    # spawn, not fork: the parent may hold torch's thread pools, which do not survive a fork.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = {pool.submit(_prepare_and_write, case, preprocess, case_path(cache, case.case_id)): case
                for case in cases}
        try:
            for job in as_completed(jobs):
                if stop.is_set():
                    for pending in jobs:
                        pending.cancel()
                if not job.cancelled():
                    yield jobs[job], *job.result()
        finally:  # on an interrupt: no new cases start; those running finish whole
            pool.shutdown(wait=True, cancel_futures=True)


def _write_index(cache: Path, config: DataConfig, fingerprint: str, entries: dict[str, dict]) -> None:
    write_json(cache / INDEX, {
        "format": "diffusion_glioma.cache/1",
        "version": __version__,
        "settings_hash": fingerprint,
        "preprocess": config.preprocess.model_dump(mode="json"),
        "modalities": list(config.preprocess.modalities),
        "labels": {str(k): v for k, v in COMMON_LABELS.items()},
        "cases": [entries[k] for k in sorted(entries)],
    })


def case_path(cache: Path, case_id: str) -> Path:
    return Path(cache) / "cases" / f"{case_id}.safetensors"


def write_case(path: Path, case: PreparedCase, source: dict[str, str]) -> None:
    tensors = {
        "image": torch.from_numpy(case.image.astype(np.float16)),
        "labels": torch.from_numpy(case.labels.astype(np.uint8)),
    }
    metadata = {
        "case_id": case.case_id, "disease": case.disease, "has_seg": json.dumps(case.has_seg),
        "geometry": case.geometry.to_json(), "source": json.dumps(source),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        chmod_like_open(tmp)


def read_index(cache: str | Path) -> dict:
    path = Path(cache) / INDEX
    if not path.is_file():
        raise DataError(f"{cache}: not a prepared cache (no {INDEX}); run `diffusion-glioma prepare` first")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: corrupt cache index ({exc})") from None
    if index.get("format") != "diffusion_glioma.cache/1":
        raise DataError(f"{path}: unknown cache format {index.get('format')!r}")
    return index


def read_case(path: str | Path, *, as_stored: bool = False) -> dict:
    """A cached case as tensors plus its facts and geometry record: image float32 and labels int64,
    or with `as_stored` the file's float16 and uint8 (a quarter of the memory; training casts on
    the device)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:  # memory-mapped: only this case is read
            metadata = f.metadata() or {}
            image = f.get_tensor("image")
            labels = f.get_tensor("labels")
            if not as_stored:
                image, labels = image.float(), labels.long()
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise DataError(f"{path}: unreadable cached case ({str(exc).splitlines()[0][:200]})") from None
    return {
        "image": image, "labels": labels, "case_id": metadata["case_id"], "disease": metadata["disease"],
        "has_seg": json.loads(metadata["has_seg"]), "geometry": GeometryRecord.from_json(metadata["geometry"]),
        "source": json.loads(metadata["source"]),
    }
