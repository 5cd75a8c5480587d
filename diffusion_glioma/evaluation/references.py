"""The reference sets that give a report's columns their meaning, scored exactly like a synthetic set
(same cases, same grid, every column):

- *same-mask truth draws* (`phantom --truth-draws`): what a perfect conditional sampler scores;
- *conditional mean*: the mean of a mask's truth draws, written twice per mask: what a perfect
  regressor scores (best on paired scores, no spread at all);
- *independent real cohort*: other real cases, at most as many as the real set: the floor of FID/KID;
- *mean-fill* and *noise* inside each real head: what a generator that learnt only the outline scores;
- *real through the model grid*: each real case resampled onto a generator's grid and back, as
  `generate` writes its outputs: what a perfect generator at that resolution scores (the ceiling).

Each is a list of items and a lazy stream of (volume, affine), one volume in memory at a time.
`paired_reference_scores` gives the paired columns' references for one real volume as the real set
passes: mean-fill, noise and another real case on the same grid.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterator

import numpy as np

from ..config import PreprocessConfig
from ..data.layouts import discover_cases
from ..data.preprocess import prepare_case, to_source
from ..errors import DataError
from .fidelity import MEAN_FILL, NOISE, paired_similarity, trivial_references
from .sets import Item, head_of, normalised, normalised_arrays

TRUTH, CONDITIONAL_MEAN, INDEPENDENT = (
    "same-mask truth draws", "conditional mean (mean of the truth draws)", "independent real cohort")
ANOTHER_REAL_CASE = "real vs another real case"
PAIRED_REFERENCES = (MEAN_FILL, NOISE, ANOTHER_REAL_CASE)


@dataclass
class ReferenceSet:
    name: str
    items: list[Item]
    volumes: Callable[[], Iterator] | None = None  # None: read and normalise each item's files


def trivial_sets(real: list[Item], modalities, seed: int) -> list[ReferenceSet]:
    """Mean-fill and noise inside the head of every real case (one volume per case)."""

    def stream(kind: str):
        for index, item in enumerate(real):
            volume, affine = normalised(item, modalities)
            head = head_of(volume)
            yield np.stack([trivial_references(volume[c], head, seed + index)[kind]
                            for c in range(len(volume))]), affine

    return [ReferenceSet(kind, [replace(item, item_id=f"{item.item_id}-{tag}") for item in real],
                         lambda kind=kind: stream(kind))
            for kind, tag in ((MEAN_FILL, "mean-fill"), (NOISE, "noise"))]


def truth_sets(truth: list[Item], real: list[Item], modalities) -> list[ReferenceSet]:
    """The truth draws as they are, and the mean of each mask's draws (twice: a regressor's two
    draws of one mask are the same volume). Only draws of masks in the real set are kept."""
    real_keys = {item.key for item in real}
    truth = sorted((item for item in truth if item.key in real_keys), key=lambda item: item.key)
    if not truth:
        raise DataError("the truth draws share no case with the real set (their manifest's case_id names the "
                        "real case whose mask they share)")
    by_key: dict[str, list[Item]] = {}
    for item in truth:
        by_key.setdefault(item.key, []).append(item)

    def mean_stream():
        for members in by_key.values():
            loaded = [normalised(item, modalities) for item in members]
            mean = np.mean([volume for volume, _ in loaded], axis=0).astype(np.float32)
            for _ in range(2):
                yield mean, loaded[0][1]

    means = [replace(members[0], item_id=f"{key}-mean-{k}") for key, members in by_key.items() for k in range(2)]
    return [ReferenceSet(TRUTH, truth), ReferenceSet(CONDITIONAL_MEAN, means, mean_stream)]


def independent_set(cohort: list[Item], real: list[Item], seed: int) -> ReferenceSet:
    """Other real cases, a seeded sample of at most the real set's size (FID and KID depend on n)."""
    shared = {item.key for item in cohort} & {item.key for item in real}
    if shared:
        raise DataError(f"the independent real cohort shares cases with the real set ({sorted(shared)[:3]}): "
                        "it would not be independent")
    order = np.random.default_rng(seed).permutation(len(cohort))[:len(real)]
    return ReferenceSet(INDEPENDENT, [cohort[i] for i in sorted(order)])


def model_grid_set(real_folder, real: list[Item], preprocess: dict, modalities) -> ReferenceSet | None:
    """Each real case through a generator's grid and back (`prepare_case`, then `to_source`, the path
    every generated volume takes): the blur and field of view a model at that resolution cannot avoid.
    None when the real folder is not a dataset layout (a set written by `generate`, say)."""
    fields = {k: v for k, v in preprocess.items() if k in PreprocessConfig.model_fields}
    config = PreprocessConfig(**{**fields, "modalities": list(modalities)})
    try:
        cases = {case.case_id: case for case in discover_cases(real_folder)}
    except DataError:
        return None
    if any(item.key not in cases for item in real):
        return None

    def stream():
        for item in real:
            prepared = prepare_case(cases[item.key], config)
            back = [to_source((channel + 1.0) / 2.0, prepared.geometry) for channel in prepared.image]
            yield normalised_arrays(back), prepared.geometry.source_affine_array

    tag = "x".join(f"{v:g}" for v in config.spacing)
    return ReferenceSet(f"real through the model grid ({tag} mm)", [replace(item, item_id=f"{item.item_id}-grid{tag}") for item in real],
                        stream)


def paired_reference_scores(volume: np.ndarray, other: np.ndarray | None, modalities, seed: int) -> dict:
    """The paired scores of references against one real volume: what a trivial generator scores
    (mean-fill, noise inside the head) and what realistic but unpaired data scores (another real case
    on the same grid, when there is one); {reference: {modality: {ssim, psnr, mae}}}."""
    head = head_of(volume)
    out = {}
    for c, m in enumerate(modalities):
        references = trivial_references(volume[c], head, seed)
        if other is not None:
            references[ANOTHER_REAL_CASE] = other[c]
        for reference, array in references.items():
            out.setdefault(reference, {})[m] = paired_similarity(volume[c], array, head)
    return out
