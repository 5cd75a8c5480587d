"""The sets an evaluation reads: a synthetic folder through its manifest (any format), any other folder
through the dataset layouts, each volume normalised the same way (percentiles inside the head ->
[0, 1], background 0), and the training record of the generator that wrote a set."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.layouts import discover_cases
from ..data.preprocess import find_head
from ..errors import DataError
from ..io import check_id, inside, load_volume


@dataclass
class Item:
    item_id: str
    key: str  # the real case it pairs with (its source mask's case), if any
    images: dict[str, Path]
    mask: Path | None
    labels: str | dict | None = None  # the mask's label scheme, when known
    disease: str | None = None
    source: str | None = None  # the real case it descends from (through augmentation); itself for real cases


def read_set(folder: str | Path, modalities: tuple[str, ...]) -> list[Item]:
    folder = Path(folder)
    manifest = folder / "manifest.jsonl"
    if manifest.is_file():
        items = []
        for number, line in enumerate(manifest.read_text().splitlines(), 1):
            if not line.strip():
                continue
            where = f"{manifest}:{number}"
            try:
                record = json.loads(line)
                output, files, case_id = record["output"], record["files"], record["case_id"]
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{where}: not a record with 'output', 'case_id' and 'files'") from None
            check_id(output, where)  # it names files in the studies' exports
            if not isinstance(files, dict):
                raise DataError(f"{where}: 'files' is not a mapping of name to path")
            missing = [m for m in modalities if m not in files]
            if missing:
                raise DataError(f"{where}: output {output} has no {missing} (the sets' modalities differ)")
            items.append(Item(output, case_id, {m: inside(folder, files[m], where) for m in modalities},
                              Path(record["source_mask"]), record.get("label_scheme"), record.get("disease"),
                              record.get("derived_from") or case_id))
        return items
    items = []
    for case in discover_cases(folder):
        missing = case.missing(modalities)
        if missing:
            raise DataError(f"{folder}: case {case.case_id} has no {missing} (the sets' modalities differ)")
        items.append(Item(case.case_id, case.case_id, {m: case.images[m] for m in modalities}, case.seg, case.labels,
                          case.disease, case.case_id))
    if not items:
        raise DataError(f"{folder}: no volumes to evaluate")
    return items


def generator_models(folder: str | Path) -> list[str]:
    """The model folders a synthetic set's manifest names (none for a folder without a manifest)."""
    manifest = Path(folder) / "manifest.jsonl"
    if not manifest.is_file():
        return []
    return sorted({m for line in manifest.read_text().splitlines() if line.strip()
                   if (m := json.loads(line).get("model"))})


def generator_training_cases(folder: str | Path) -> set[str]:
    """The real cases the generator of a synthetic set trained on (from its manifest's model folder)."""
    from ..provenance import trained_cases

    return set().union(*(trained_cases(m) for m in generator_models(folder)))


def generator_training_items(folder: str | Path, modalities) -> tuple[list[Item], str | None]:
    """The training cases of the generator(s) of a synthetic set as a readable set, from each model
    folder's training.json (its cases and the raw folder they were prepared from): (items, None), or
    ([], why not) when the record or the folder is not here (a hub model's record names no paths)."""
    models = generator_models(folder)
    if not models:
        return [], "no manifest names the generator"
    items: list[Item] = []
    for model in models:
        try:
            facts = json.loads((Path(model) / "training.json").read_text())
        except (OSError, ValueError):
            return [], f"{model} has no readable training.json"
        raw = ((facts.get("config") or {}).get("data") or {}).get("raw")
        cases = set(facts.get("cases") or [])
        if not raw or not Path(raw).is_dir():
            return [], f"the training folder {raw or '(none recorded)'} of {model} is not here"
        found = [item for item in read_set(raw, modalities) if item.key in cases]
        if not found:
            return [], f"none of the recorded training cases of {model} is in {raw}"
        items += [item for item in found if item.key not in {i.key for i in items}]
    return items, None


def generator_grids(folder: str | Path) -> list[dict]:
    """The preprocessing (grid, spacing) of the models that wrote a synthetic set, from their
    folders' model_index.json; empty for a folder without a manifest or a model folder gone since."""
    grids = []
    for model in generator_models(folder):
        try:
            preprocess = json.loads((Path(model) / "model_index.json").read_text()).get("preprocess")
        except (OSError, ValueError):
            continue
        if isinstance(preprocess, dict) and preprocess not in grids:
            grids.append(preprocess)
    return grids


def normalised(item: Item, modalities) -> tuple[np.ndarray, np.ndarray]:
    """(modality, x, y, z) in [0, 1] on the item's own grid, and its affine."""
    volumes = [load_volume(item.images[m]) for m in modalities]
    for v in volumes[1:]:
        if v.shape != volumes[0].shape:
            raise DataError(f"{v.path}: shape {v.shape} differs from {volumes[0].path.name}")
    return normalised_arrays([v.array for v in volumes]), volumes[0].affine


def normalised_arrays(arrays: list[np.ndarray]) -> np.ndarray:
    """One volume's modalities, each scaled by its 0.5-99.5 percentiles inside the head to [0, 1]."""
    head = find_head(arrays, 0.1)
    out = []
    for a in arrays:
        low, high = np.percentile(a[head], (0.5, 99.5))
        scaled = np.clip((a - low) / max(high - low, 1e-6), 0, 1)
        scaled[~head] = 0
        out.append(scaled.astype(np.float32))
    return np.stack(out)


def tumour_of(item: Item) -> np.ndarray | None:
    """The item's tumour (any tumour label of the common scheme) on its mask's own voxel grid; None
    when the item has no mask or no known label scheme."""
    from ..labels import TUMOUR_LABELS, get_scheme

    if item.mask is None or item.labels is None:
        return None
    return np.isin(get_scheme(item.labels).to_common(load_volume(item.mask, kind="label").array, item.mask),
                   TUMOUR_LABELS)


def head_of(volume: np.ndarray) -> np.ndarray:
    """The head of a normalised (modality, x, y, z) volume: where any modality is above 0."""
    return (volume > 0).any(axis=0)
