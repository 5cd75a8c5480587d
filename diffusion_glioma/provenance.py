"""Which real case every derived file comes from, so that no study tests on what a model trained on.

`augment-masks` and `generate` write a `manifest.jsonl` whose records name the real case each output
descends from (`derived_from`, followed through any chain of augmentation and generation); a
training run records the cases it trained on (`training.json`, `cases`). Studies draw held-out
cases from outside a generator's record and train on nothing derived from them.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import DataError


def read_sources(folder: str | Path) -> dict[str, str]:
    """{output id: original real case id} from a folder's manifest.jsonl; empty without one."""
    manifest = Path(folder) / "manifest.jsonl"
    if not manifest.is_file():
        return {}
    sources = {}
    for number, line in enumerate(manifest.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
            sources[record["output"]] = record.get("derived_from") or record["case_id"]
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{manifest}: line {number} is not a record with 'output' and 'case_id'") from None
    return sources


def trained_cases(model_dir: str | Path | None) -> set[str]:
    """The real cases a pipeline folder's training run saw (its training.json), as original ids."""
    if model_dir is None:
        return set()
    facts = Path(model_dir) / "training.json"
    if not facts.is_file():
        return set()
    return set(json.loads(facts.read_text()).get("cases", []))


def check_no_leak(train_sources: dict[str, str], held_out: set[str], study: str) -> None:
    """Stop when anything a study trains on descends from one of its held-out cases."""
    leaked = sorted(item for item, source in train_sources.items() if source in held_out)
    if leaked:
        raise DataError(f"{study}: {len(leaked)} training item(s) derive from held-out cases "
                        f"(e.g. {leaked[0]} from {train_sources[leaked[0]]}); hold those cases out of the "
                        "generator and of augmentation, or choose other test cases")
