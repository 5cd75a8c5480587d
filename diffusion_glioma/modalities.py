"""The four MRI contrasts by their BraTS 2023 names, and the aliases seen in the wild. Its own module
so that the config (which validates modality names) and the layouts (which find them in file names)
both read it from below."""

from __future__ import annotations

from .errors import DataError

MODALITIES = ("t1n", "t1c", "t2w", "t2f")

# Names seen in the wild for each BraTS 2023 modality, matched case-insensitively.
MODALITY_ALIASES: dict[str, tuple[str, ...]] = {
    "t1n": ("t1n", "t1", "t1w", "t1native", "native"),
    "t1c": ("t1c", "t1ce", "t1gd", "t1-gd", "t1post", "t1wce"),
    "t2w": ("t2w", "t2"),
    "t2f": ("t2f", "flair", "t2flair", "t2-flair"),
}


def canonical_modality(name: str) -> str:
    """Map an alias (`t1ce`, `FLAIR`, `T1GD` ...) to its BraTS 2023 name, or raise."""
    lowered = name.lower()
    for modality, aliases in MODALITY_ALIASES.items():
        if lowered in aliases:
            return modality
    known = sorted({a for aliases in MODALITY_ALIASES.values() for a in aliases})
    raise DataError(f"unknown modality {name!r}; known names: {known}")
