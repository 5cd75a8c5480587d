"""Torch datasets over a prepared cache."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .cache import case_path, read_case, read_index


class CachedCases(Dataset):
    """Cases of a prepared cache as `{"image", "labels", "disease", "case_id"}` items.

    `image` is float32 (modality, x, y, z) in [-1, 1]; `labels` is int64 (x, y, z) in the common
    scheme; `disease` is the disease's index in `diseases` (so index 0 can stay "none" for
    classifier-free guidance). `limit` keeps the first N cases after filtering (few-shot runs);
    `case_ids` keeps only the cases named.
    Small caches are held in memory after the first read.
    """

    def __init__(self, cache: str | Path, *, diseases: list[str] | None = None, require_seg: bool = True,
                 only_diseases: list[str] | None = None, limit: int | None = None, case_ids: list[str] | None = None,
                 in_memory: bool = True):
        self.cache = Path(cache)
        index = read_index(self.cache)
        self.modalities: list[str] = index["modalities"]
        entries = [e for e in index["cases"] if e["has_seg"] or not require_seg]
        if only_diseases is not None:
            entries = [e for e in entries if e["disease"] in only_diseases]
        if case_ids is not None:
            entries = [e for e in entries if e["case_id"] in set(case_ids)]
        if limit is not None:
            entries = entries[:limit]
        if not entries:
            raise DataError(f"{self.cache}: no cases left after filtering (require_seg={require_seg}, "
                            f"diseases={only_diseases})")
        self.entries = entries
        self.diseases = diseases if diseases is not None else ["none", *sorted({e["disease"] for e in entries})]
        unknown = sorted({e["disease"] for e in entries} - set(self.diseases))
        if unknown:
            raise DataError(f"{self.cache}: diseases {unknown} are not among the model's classes {self.diseases}")
        self.in_memory = in_memory
        self._memory: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def case_ids(self) -> list[str]:
        return [e["case_id"] for e in self.entries]

    def __getitem__(self, i: int) -> dict:
        if i in self._memory:
            return self._memory[i]
        case = read_case(case_path(self.cache, self.entries[i]["case_id"]))
        item = {
            "image": case["image"],
            "labels": case["labels"],
            "disease": torch.tensor(self.diseases.index(case["disease"]), dtype=torch.long),
            "case_id": case["case_id"],
        }
        if self.in_memory:
            self._memory[i] = item
        return item
