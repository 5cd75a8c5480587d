"""Torch datasets over a prepared cache."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .cache import case_path, read_case, read_index


class CachedCases(Dataset):
    """Cases of a prepared cache as `{"image", "labels", "disease", "case_id"}` items.

    Items keep the cache's storage types, which are what the data loader ships: `image` float16
    (modality, x, y, z) in [-1, 1], `labels` uint8 (x, y, z) in the common scheme. Training casts and
    one-hot encodes on the device, inside the step. `disease` is the disease's index in `diseases`
    (index 0 stays "none" for classifier-free guidance). `limit` keeps the first N cases after
    filtering (few-shot runs); `case_ids` keeps only the cases named.

    A case is read from its file when it is asked for, so memory does not grow with the dataset.
    `memory_cache_gb` > 0 keeps cases in memory up to that many GB (per process and per data-loader
    worker: each holds its own), for small datasets on slow disks.
    """

    def __init__(self, cache: str | Path, *, diseases: list[str] | None = None, require_seg: bool = True,
                 only_diseases: list[str] | None = None, limit: int | None = None, case_ids: list[str] | None = None,
                 memory_cache_gb: float = 0.0):
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
        self.memory_budget = int(memory_cache_gb * 1e9)
        self._memory: dict[int, dict] = {}
        self._memory_used = 0

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def case_ids(self) -> list[str]:
        return [e["case_id"] for e in self.entries]

    def __getitem__(self, i: int) -> dict:
        if i in self._memory:
            return self._memory[i]
        case = read_case(case_path(self.cache, self.entries[i]["case_id"]), as_stored=True)
        item = {
            "image": case["image"],
            "labels": case["labels"],
            "disease": torch.tensor(self.diseases.index(case["disease"]), dtype=torch.long),
            "case_id": self.entries[i]["case_id"],
        }
        size = item["image"].nbytes + item["labels"].nbytes
        if self._memory_used + size <= self.memory_budget:  # first come, kept until the end
            self._memory[i] = item
            self._memory_used += size
        return item
