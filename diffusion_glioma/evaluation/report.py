"""`evaluate`: score synthetic sets against a real one and write a report with figures.

    diffusion-glioma evaluate --real REAL --synthetic SYN_A SYN_B --names diffusion cgan --out REPORT

A synthetic folder written by `generate` is read through its manifest (any format); any other
folder through the dataset layouts. Every volume is normalised the same way (percentiles inside the
head -> [0, 1], background 0), so real and synthetic are compared on equal terms.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.layouts import MODALITIES
from ..errors import DataError
from ..figures import to_ras
from ..io import return_freed_memory
from .features import FeatureReservoir, InceptionFeatures, RandomFeatures, TorchScriptFeatures3D, shipped_inception_path
from .fidelity import (SLICE_SIZE, VOLUME_SIZE, fid_interval, frechet_distance, kid_interval, kid_kernels,
                       kid_over_subsets, mean_and_sd, memorisation, memorisation_against_training, ms_ssim_diversity,
                       paired_similarity)
from .references import (PAIRED_REFERENCES, TRUTH, independent_set, model_grid_set, paired_reference_scores,
                         trivial_sets, truth_sets)
from .sets import (Item, generator_grids, generator_training_cases, generator_training_items, head_of, normalised,
                   read_set, tumour_of)


def _to_ras_stack(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return np.stack([to_ras(c, affine) for c in volume])


AXES = ("sagittal", "coronal", "axial")  # RAS voxel axes 0, 1, 2


def _slices(volume_ras: np.ndarray, max_per_axis: int, tumour_ras: np.ndarray | None) -> dict[str, torch.Tensor]:
    """Slices along each axis, resized, as `{"axial/all": (n, modality, h, w), "axial/tumour": …}`:
    evenly spread over the head, and (when the mask is known) over the tumour."""
    out = {}
    head = volume_ras.max(axis=0) > 0
    for axis, axis_name in enumerate(AXES):
        others = tuple(a for a in range(3) if a != axis)
        for subset, region in (("all", head), ("tumour", tumour_ras)):
            if region is None:
                continue
            filled = np.flatnonzero(region.any(axis=others))
            if not len(filled):
                continue
            picks = np.linspace(filled[0], filled[-1], min(max_per_axis, len(filled))).round().astype(int)
            slices = [torch.from_numpy(np.take(volume_ras, i, axis=axis + 1).copy()) for i in picks]
            out[f"{axis_name}/{subset}"] = F.interpolate(torch.stack(slices), size=SLICE_SIZE, mode="bilinear",
                                                         align_corners=False)
    return out


class Extractors:
    """The feature networks of one report: 2D (Inception or the random fallback) and 3D (a user's
    TorchScript network or the random fallback), and how the report names them."""

    def __init__(self, modalities, features: str, inception_weights, features_3d, seed: int):
        if features not in ("auto", "inception", "random"):
            raise DataError(f"unknown features {features!r}; choose auto, inception or random")
        if features == "auto":  # Inception when its weights are installed, else the labelled random network
            features = "inception" if inception_weights or shipped_inception_path() else "random"
        self.inception = InceptionFeatures(inception_weights) if features == "inception" else None
        self.random_2d = RandomFeatures(2, 1, seed)
        self.network_3d = TorchScriptFeatures3D(features_3d) if features_3d is not None else None
        self.random_3d = RandomFeatures(3, 1, seed)
        self.random_3d_all = RandomFeatures(3, len(modalities), seed)
        self.description = {
            "2d": f"FID InceptionV3, 2048 features ({self.inception.path.name})" if self.inception
            else f"seeded random 2D CNN (seed {seed})",
            "3d": (f"TorchScript network {Path(features_3d).name}, {self.network_3d.dimensions} features per modality"
                   if self.network_3d else f"seeded random 3D CNN (seed {seed})") + f" at {list(VOLUME_SIZE)}"}

    def slices(self, stack: torch.Tensor) -> torch.Tensor:
        return self.inception(stack) if self.inception else self.random_2d(stack)

    def volume(self, small: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(modality, *VOLUME_SIZE) -> features per modality, and over all modalities."""
        net = self.network_3d or self.random_3d
        per_modality = [net(small[None, c:c + 1])[0] for c in range(len(small))]
        together = torch.cat(per_modality) if self.network_3d else self.random_3d_all(small[None])[0]
        return per_modality, together


@dataclass
class SetData:
    """What one pass over a set keeps: 3D features and per-volume scores for every volume, a bounded
    sample of slice features, whole volumes for only a bounded few (memory does not grow with the
    set's size beyond a few numbers per volume)."""

    items: list[Item]
    f3d: dict = field(default_factory=dict)  # modality -> [features per volume]
    f3d_all: list = field(default_factory=list)
    f2d: dict = field(default_factory=dict)  # modality -> (disease, slice subset "axial/all") -> FeatureReservoir
    hist: dict = field(default_factory=dict)  # modality -> summed histogram inside the head
    small: dict = field(default_factory=dict)  # volume index -> (modality, *VOLUME_SIZE), for a bounded sample
    paired: list = field(default_factory=list)  # synthetic: (index, {modality: {ssim, psnr, mae}}) vs its real volume
    references: list = field(default_factory=list)  # real: (index, {reference set: {modality: {...}}})
    shown: list = field(default_factory=list)  # (index, volume, affine) of the first few, for samples.png
    groups: dict = field(default_factory=dict)  # synthetic: mask key -> MaskGroup.summary() of its draws

    def indices(self, disease: str | None = None) -> list[int]:
        return [i for i, item in enumerate(self.items) if disease is None or item.disease == disease]


# Slice features kept per disease, modality and slice subset (axis x all/tumour) of a set: a seeded uniform
# sample beyond this (2D FID and KID use it), so their memory is bounded whatever the set's size: 2048
# Inception features x 2560 rows x 6 subsets x 4 modalities is 500 MB per disease and set. More rows than
# Inception has dimensions, so that one axis's covariance can be of full rank.
SLICE_RESERVOIR = 2560
DIVERSITY_SAMPLE = 64  # volumes kept at VOLUME_SIZE for the across-set MS-SSIM (it uses 50 pairs)
FIXED_MASK_GROUPS = 16  # masks with several samples kept for the MS-SSIM at a fixed mask
SHOWN = 3
TRIM_EVERY = 8  # volumes between returns of the freed heap to the system (`return_freed_memory`)


def _kept_for_diversity(items: list[Item], seed: int) -> set[int]:
    """A seeded sample across the set, and every sample of the first masks that have several."""
    rng = np.random.default_rng(seed)
    keep = set(rng.permutation(len(items))[:DIVERSITY_SAMPLE].tolist())
    by_key: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        by_key.setdefault(item.key, []).append(i)
    groups = [members for members in by_key.values() if len(members) >= 2][:FIXED_MASK_GROUPS]
    return keep.union(*groups) if groups else keep


def _collect(name: str, items: list[Item], modalities, extractors: Extractors, max_slices: int, seed: int,
             real_by_key: dict[str, Item] | None, progress: bool, volumes: Iterator | None = None,
             with_slices: bool = True) -> SetData:
    """One streaming pass over a set. For a synthetic or reference set (`real_by_key` given) each
    volume is scored against the real volume of its mask, which is read again (consecutive outputs of
    one mask share it), and the draws of each mask are summarised as they pass (spread, two-draw
    ratio, correlation: they must be consecutive, which `_by_mask` ensures); for the real set, each
    volume scores the paired references. `volumes` yields (volume, affine) per item for sets made in
    memory (the references); by default each item is read and normalised. `with_slices=False` skips
    the 2D slice features (the references' rows show 3D distances only)."""
    from .conditional import MaskGroup

    data = SetData(items, f3d={m: [] for m in modalities}, f2d={m: {} for m in modalities},
                   hist={m: np.zeros(50, dtype=np.int64) for m in modalities})
    keep = _kept_for_diversity(items, seed)
    last_real: tuple[str, tuple] | None = None
    group: tuple[str, MaskGroup] | None = None
    previous_by_grid: dict = {}  # grid -> the previous real volume on it ("real vs another real case")
    volumes = volumes if volumes is not None else (normalised(item, modalities) for item in items)
    for index, (item, (volume, affine)) in enumerate(tqdm(zip(items, volumes), total=len(items), desc=f"evaluate {name}",
                                                          unit="volume", disable=not progress)):
        if index % TRIM_EVERY == 0:
            return_freed_memory()
        ras, small, per_modality, together = _volume_features(volume, affine, extractors)
        data.f3d_all.append(together)
        slices = {}
        if with_slices:
            tumour = tumour_of(item)
            slices = _slices(ras, max_slices, None if tumour is None else to_ras(tumour, affine))
        for c, m in enumerate(modalities):
            data.f3d[m].append(per_modality[c])
            for key, stack in slices.items():
                if (item.disease, key) not in data.f2d[m]:  # each set its own draw; the same slices for every modality
                    data.f2d[m][item.disease, key] = FeatureReservoir(SLICE_RESERVOIR, [seed, zlib.crc32(name.encode())])
                data.f2d[m][item.disease, key].add(index, extractors.slices(stack[:, c:c + 1]))
            data.hist[m] += np.histogram(volume[c][volume[c] > 0], bins=50, range=(0, 1))[0]
        if index in keep:
            data.small[index] = small.half()  # half precision: MS-SSIM does not need more
        if real_by_key is None:
            grid = (volume.shape, tuple(np.round(affine, 3).ravel()))
            data.references.append((index, paired_reference_scores(volume, previous_by_grid.get(grid), modalities, seed + index)))
            previous_by_grid[grid] = volume
        else:
            real_volume = None
            if item.key in real_by_key:
                real_item = real_by_key[item.key]
                if last_real is None or last_real[0] != item.key:
                    last_real = (item.key, normalised(real_item, modalities))
                real_volume, real_affine = last_real[1]
                if real_volume.shape != volume.shape or not np.allclose(real_affine, affine, atol=1e-3):
                    raise DataError(f"{item.images.get(modalities[0], item.item_id)}: grid differs from its real volume "
                                    f"{real_item.images[modalities[0]]}; paired metrics need the same grid")
                real_head = head_of(real_volume)
                data.paired.append((index, {m: paired_similarity(real_volume[c], volume[c], real_head)
                                            for c, m in enumerate(modalities)}))
            if group is None or group[0] != item.key:
                if group is not None:
                    data.groups[group[0]] = group[1].summary()
                group = (item.key, MaskGroup(real_volume, head_of(real_volume if real_volume is not None else volume)))
            if volume.shape[1:] != group[1].head.shape:
                raise DataError(f"{item.images.get(modalities[0], item.item_id)}: grid differs from the other "
                                f"outputs of mask {item.key}")
            group[1].add(volume)
        if len(data.shown) < SHOWN and (real_by_key is None or item.key in real_by_key):
            data.shown.append((index, volume, affine))
    if group is not None:
        data.groups[group[0]] = group[1].summary()
    return data


def _volume_features(volume: np.ndarray, affine: np.ndarray, extractors: Extractors):
    """(RAS volume, its VOLUME_SIZE copy, 3D features per modality, all modalities together)."""
    ras = _to_ras_stack(volume, affine)
    small = F.interpolate(torch.from_numpy(ras)[None], size=VOLUME_SIZE, mode="trilinear", align_corners=False)[0]
    per_modality, together = extractors.volume(small)
    return ras, small, per_modality, together


def _training_features(items: list[Item], modalities, extractors: Extractors, progress: bool) -> torch.Tensor:
    rows = [_volume_features(*normalised(item, modalities), extractors)[3]
            for item in tqdm(items, desc="evaluate: the generator's training cases", unit="volume", disable=not progress)]
    return torch.stack(rows)


def _by_mask(items: list[Item]) -> list[Item]:
    """The outputs of each mask next to each other (a stable sort: draw order is kept)."""
    return sorted(items, key=lambda item: item.key)


def _mean_paired(scores: list[dict], modalities) -> dict:
    """Mean SSIM/PSNR/MAE per modality over per-volume score dicts ({modality: {metric: value}})."""
    out = {}
    for m in modalities:
        out[m] = {k: (float(np.mean([s[m][k] for s in scores])) if scores else None) for k in ("ssim", "psnr", "mae")}
    return out


def _paired_references(real: SetData, indices: set[int], modalities) -> dict:
    scores = [s for i, s in real.references if i in indices]
    return {ref: _mean_paired([s[ref] for s in scores if ref in s], modalities) for ref in PAIRED_REFERENCES}


def _pooled_2d(data: SetData, m: str, indices: set[int], subset: str = "/all") -> torch.Tensor:
    chosen = [rows for (_, key), reservoir in data.f2d[m].items() if key.endswith(subset)
              if len(rows := reservoir.rows_of(indices))]
    return torch.cat(chosen) if chosen else torch.zeros(0, 1)


def _fixed_mask_diversity(data: SetData, indices: set[int]) -> dict | None:
    """Mean MS-SSIM between samples of the same mask (1: every sample of a mask is the same volume)."""
    groups: dict[str, list[int]] = {}
    for i in sorted(indices):
        if i in data.small:
            groups.setdefault(data.items[i].key, []).append(i)
    values = [ms_ssim_diversity(torch.stack([data.small[i].float() for i in members]))
              for members in groups.values() if len(members) >= 2]
    if not values:
        return None
    return {"ms_ssim": float(np.mean(values)), "masks": len(values),
            "samples_per_mask": float(np.mean([len(g) for g in groups.values() if len(g) >= 2]))}


def _across_set_diversity(data: SetData, indices: set[int]) -> float | None:
    """Mean MS-SSIM between volumes of different masks (one volume per mask)."""
    first_per_key = {}
    for i in sorted(indices):
        if i in data.small:
            first_per_key.setdefault(data.items[i].key, i)
    chosen = list(first_per_key.values())
    return ms_ssim_diversity(torch.stack([data.small[i].float() for i in chosen])) if len(chosen) >= 2 else None


def _conditional(syn: SetData, syn_idx: set[int], truth_groups: dict | None) -> dict:
    """Sampler or regressor, over the masks with several draws (evaluation/conditional.py): the
    two-draw ratio, the spread over the truth's same-mask spread (needs the truth draws) and a draw's
    correlation with its real case; mean and sd over masks."""
    keys = {syn.items[i].key for i in syn_idx}
    groups = {k: g for k, g in syn.groups.items() if k in keys}
    several = {k: g for k, g in groups.items() if g["draws"] >= 2}
    ratios = [g["spread"] / truth_groups[k]["spread"] for k, g in several.items()
              if truth_groups and (truth_groups.get(k) or {}).get("spread")]
    summary = lambda values: mean_and_sd(values) if values else None  # noqa: E731
    return {"masks_with_several_draws": len(several),
            "draws_per_mask": float(np.mean([g["draws"] for g in several.values()])) if several else None,
            "two_draw_ratio": summary([g["two_draw_ratio"] for g in several.values() if g["two_draw_ratio"] is not None]),
            "spread_ratio": summary(ratios),
            "correlation_with_real": summary([g["correlation_with_real"] for g in groups.values()
                                              if g["correlation_with_real"] is not None])}


def _block(real: SetData, syn: SetData, modalities, real_idx: set[int], syn_idx: set[int], seed: int,
           by_slices: bool, truth_groups: dict | None = None) -> dict:
    """Every distribution, paired and conditional metric for a subset of the real set against a
    subset of a synthetic one (the whole sets, or one disease's volumes)."""
    r_all = torch.stack([real.f3d_all[i] for i in sorted(real_idx)])
    s_all = torch.stack([syn.f3d_all[i] for i in sorted(syn_idx)])
    kernels = kid_kernels(r_all, s_all)  # once for the KID and its interval
    kid = kid_over_subsets(r_all, s_all, seed=seed, kernels=kernels)
    if kid is not None:
        kid["ci95"] = kid_interval(r_all, s_all, seed=seed, kernels=kernels)
    del kernels  # not held through the 2D metrics below (tens of MB at BraTS counts)
    block = {"volumes": [len(real_idx), len(syn_idx)], "fid_3d": frechet_distance(r_all, s_all),
             "fid_3d_ci95": fid_interval(r_all, s_all, seed=seed), "kid_3d": kid, "per_modality": {}}
    for m in modalities:
        r2d, s2d = _pooled_2d(real, m, real_idx), _pooled_2d(syn, m, syn_idx)
        r3d = torch.stack([real.f3d[m][i] for i in sorted(real_idx)])
        s3d = torch.stack([syn.f3d[m][i] for i in sorted(syn_idx)])
        entry = {"fid_2d": frechet_distance(r2d, s2d), "kid_2d": kid_over_subsets(r2d, s2d, seed=seed),
                 "slices": [len(r2d), len(s2d)],
                 "fid_3d": frechet_distance(r3d, s3d), "kid_3d": kid_over_subsets(r3d, s3d, seed=seed)}
        if by_slices:  # every axis and subset (all slices / tumour slices) on its own
            entry["by_slices"] = {}
            for key in sorted({k for _, k in real.f2d[m]} & {k for _, k in syn.f2d[m]}):
                rk, sk = _pooled_2d(real, m, real_idx, key), _pooled_2d(syn, m, syn_idx, key)
                entry["by_slices"][key] = {"fid": frechet_distance(rk, sk), "kid": kid_over_subsets(rk, sk, seed=seed),
                                           "slices": [len(rk), len(sk)]}
        block["per_modality"][m] = entry
    pairs = [scores for i, scores in syn.paired if i in syn_idx]
    block["paired"] = {"pairs": len(pairs), **_mean_paired(pairs, modalities)}
    block["paired_references"] = _paired_references(real, real_idx, modalities)
    block["diversity_ms_ssim"] = _across_set_diversity(syn, syn_idx)
    block["real_diversity_ms_ssim"] = _across_set_diversity(real, real_idx)
    block["fixed_mask_diversity"] = _fixed_mask_diversity(syn, syn_idx)
    block["conditional"] = _conditional(syn, syn_idx, truth_groups)
    return block


def evaluate(real: str | Path, synthetic: list[str | Path], out: str | Path, *, names: list[str] | None = None,
             modalities: tuple[str, ...] = MODALITIES, features: str = "auto", inception_weights=None,
             max_slices: int = 8, segmentation_steps: int = 200, features_3d: str | Path | None = None, seed: int = 0,
             anomaly_steps: int | None = None, segmentation_seeds: list[int] | None = None,
             nnunet_study: str | Path | None = None, truth: str | Path | None = None,
             real_reference: str | Path | None = None, segmentation_test: str | Path | None = None,
             segmentation_schedule: str = "constant", segmentation_regimes: tuple[str, ...] | None = None,
             classification_steps: int | None = None, progress: bool = True) -> dict:
    """Score each synthetic folder against `real`, beside reference sets made on the same cases and
    grid (references.py): mean-fill and noise always, the same-mask truth draws and their conditional
    mean when `truth` names them (`phantom --truth-draws`), an independent real cohort when
    `real_reference` does. `segmentation_test`, a folder of real cases with segmentations, is the
    segmentation study's fixed test set (default: a third of `real`, held out); `segmentation_regimes`
    its training mixes beside the real one (default: all), `classification_steps` its disease
    classifiers' training (default: `segmentation_steps`; 0 skips them). The study's trained models
    are kept in `out`/trained_models, so running it again trains only what it lacks.
    """
    out = Path(out)
    names = names or [Path(s).name for s in synthetic]
    if len(names) != len(synthetic):
        raise DataError(f"{len(names)} names for {len(synthetic)} synthetic folders")
    if segmentation_steps > 0 and segmentation_regimes:
        from .segmentation import check_regimes

        check_regimes(segmentation_regimes)  # before the hours of scoring, not after
    sets = {"real": read_set(real, modalities),
            **{n: _by_mask(read_set(s, modalities)) for n, s in zip(names, synthetic)}}
    references = trivial_sets(sets["real"], modalities, seed)
    if truth is not None:
        references += truth_sets(read_set(truth, modalities), sets["real"], modalities)
    if real_reference is not None:
        references.append(independent_set(read_set(real_reference, modalities), sets["real"], seed))
    grids = [grid for folder in synthetic for grid in generator_grids(folder)]
    for grid in [g for i, g in enumerate(grids) if g not in grids[:i]]:
        through_grid = model_grid_set(real, sets["real"], grid, modalities)
        references += [through_grid] if through_grid is not None else []
    extractors = Extractors(modalities, features, inception_weights, features_3d, seed)
    # The 2D features' cost per volume, bounded by --max-slices: slices over the head and over the tumour
    # along each of the three axes, for each modality.
    extractors.description["2d"] += (f"; at most {max_slices} slices per axis over the head and {max_slices} over "
                                     f"the tumour, so at most {6 * max_slices} slices per modality and volume")

    # 1. One streaming pass per set.
    real_data = _collect("real", sets["real"], modalities, extractors, max_slices, seed, None, progress)
    real_by_key = {item.key: item for item in sets["real"]}
    data = {"real": real_data, **{n: _collect(n, sets[n], modalities, extractors, max_slices, seed, real_by_key,
                                              progress) for n in names}}
    reference_data = {r.name: _collect(r.name, r.items, modalities, extractors, max_slices, seed, real_by_key, progress,
                                       r.volumes() if r.volumes else None, with_slices=False) for r in references}
    truth_groups = reference_data[TRUTH].groups if TRUTH in reference_data else None

    # 2. Metrics per synthetic set: overall and per disease.
    results: dict = {"feature_extractor": extractors.description,
                     "counts": {n: len(d.items) for n, d in data.items()}, "sets": {}}
    notes = []
    training_records = {name: generator_training_cases(folder) for name, folder in zip(names, synthetic)}
    folder_of = dict(zip(names, synthetic))
    training_pools: dict[tuple, torch.Tensor] = {}  # generators that share training cases share their features
    everything_real = set(real_data.indices())
    real_ids = {i.item_id for i in sets["real"]}
    results["real_diversity_ms_ssim"] = _across_set_diversity(real_data, everything_real)
    results["paired_references"] = _paired_references(real_data, everything_real, modalities)
    for name in names:
        syn = data[name]
        entry = _block(real_data, syn, modalities, everything_real, set(syn.indices()), seed, by_slices=True,
                       truth_groups=truth_groups)
        entry["by_disease"] = {}
        for disease in sorted({i.disease for i in syn.items if i.disease} & {i.disease for i in sets["real"]}):
            entry["by_disease"][disease] = _block(real_data, syn, modalities, set(real_data.indices(disease)),
                                                  set(syn.indices(disease)), seed, by_slices=False,
                                                  truth_groups=truth_groups)
        training = training_records[name]
        pool, why_not = [], None
        if training and not training & real_ids:  # a held-out real set: read the training cases themselves
            pool, why_not = generator_training_items(folder_of[name], modalities)
        if pool:
            key = tuple(sorted(i.key for i in pool))
            if key not in training_pools:
                training_pools[key] = _training_features(pool, modalities, extractors, progress)
            mem = memorisation_against_training([i.key for i in pool], training_pools[key],
                                                torch.stack(real_data.f3d_all), [i.item_id for i in syn.items],
                                                torch.stack(syn.f3d_all))
            against = ("the generator's training cases (read from its training record's folder); threshold: the "
                       "held-out real cases' distances to them")
        else:
            mem = memorisation([i.item_id for i in sets["real"]], torch.stack(real_data.f3d_all),
                               [i.item_id for i in syn.items], torch.stack(syn.f3d_all),
                               [i.source or i.key for i in syn.items], training=training or None)
            against = "the generator's training cases" if training else "every real case (training record unknown)"
        entry["memorisation"] = {
            "against": against, "why_not": why_not,
            "threshold": mem.threshold, "quantile": mem.quantile, "suspicious": mem.suspicious,
            "nearest": [{"synthetic": s, "real": r, "distance": d} for s, r, d in mem.nearest]}
        results["sets"][name] = entry
        draws = entry["conditional"]["draws_per_mask"]
        if draws is not None and draws < 4:
            notes.append(f"{name}: {draws:g} draws per mask; the spread of a mask's draws and the two-draw ratio "
                         "are noisy below 4 (generate --per-mask 4).")
    # The references, scored as a set is (no memorisation or segmentation: they are not generators).
    results["references"] = {name: _block(real_data, ref, modalities, everything_real, set(ref.indices()), seed,
                                          by_slices=False, truth_groups=truth_groups)
                             for name, ref in reference_data.items()}
    results["counts"].update({f"reference: {name}": len(ref.items) for name, ref in reference_data.items()})
    if truth_groups is None:
        notes.append("No same-mask truth draws (--truth): the spread of draws has no reference and shows as n/a; "
                     "phantom cohorts can draw them (diffusion-glioma phantom --truth-draws K).")
    if segmentation_steps > 0:
        from .segmentation import (POWERED_SEEDS, POWERED_TEST_CASES, TrainedModels, across_seeds, between_sets,
                                   prepare_segmented, segmentation_study)

        real_cases = prepare_segmented(sets["real"])
        test_cases = None
        if segmentation_test is not None:
            test_cases = prepare_segmented(read_set(segmentation_test, modalities))
            if not test_cases:
                raise DataError(f"{segmentation_test}: no real cases with segmentations for the segmentation test set")
        # Every trained model is kept in the report folder: the real regime is trained once per split and seed
        # (not once per synthetic set), and an interrupted or extended study trains only what it lacks.
        store = TrainedModels(out / "trained_models")
        for name in names:
            synthetic_cases = prepare_segmented(sets[name])
            # One split (drawn by --seed) for every training seed: the spread over seeds is the training's luck.
            runs = [segmentation_study(real_cases, synthetic_cases, segmentation_steps, s, split_seed=seed,
                                       generator_cases=training_records[name], anomaly_steps=anomaly_steps,
                                       store=store, test=test_cases, schedule=segmentation_schedule,
                                       regimes=segmentation_regimes, classification_steps=classification_steps)
                    for s in (segmentation_seeds or [seed])]
            results["sets"][name]["segmentation"] = runs[0]
            if len(runs) > 1:
                results["sets"][name]["segmentation"]["across_seeds"] = across_seeds(runs, segmentation_seeds)
        notes.append(f"Segmentation study: {store.trained} segmenters and classifiers trained, {store.found} found "
                     f"already trained in {store.folder} (the same data, recipe and seed).")
        # The generators against each other, case by case: the column that ranks them.
        results["segmentation_between_sets"] = between_sets({n: results["sets"][n]["segmentation"] for n in names})
        studies = [results["sets"][n]["segmentation"] for n in names]
        tested = [len(study["test_cases"]) for study in studies if "test_cases" in study]
        seeds = len(segmentation_seeds or [seed])
        if tested and (min(tested) < POWERED_TEST_CASES or seeds < POWERED_SEEDS):
            notes.append(f"Segmentation study on {min(tested)} held-out test cases and {seeds} training seed(s): "
                         f"indicative only; ranking generators by it needs at least {POWERED_TEST_CASES} test cases "
                         f"(--segmentation-test, a folder of real cases; inference is cheap) and {POWERED_SEEDS} "
                         "seeds (--segmentation-seeds), and a segmenter trained to its plateau "
                         "(scripts/segmentation_learning_curve.py).")
        rate = "nnU-Net's poly decay" if segmentation_schedule == "poly" else "a constant learning rate"
        results["segmentation_setup"] = (f"MONAI UNet (16-32-64), {segmentation_steps} steps at {rate}, Dice + BCE on WT/TC/ET, "
                                         "32^3 grid of 6 mm; "
                                         + (f"tested on the {len(test_cases)} real cases of {segmentation_test}"
                                            if test_cases is not None else
                                            "a third of the real cases held out for testing (one split, drawn by "
                                            "--seed, for every training seed), drawn from outside the generator's "
                                            "training record")
                                         + "; nothing derived from a test case is trained on; 'half real' is a "
                                           "random half of each disease's cases, the same one with and without "
                                           "the synthetic volumes")
    if nnunet_study is not None:  # nnU-Net's scores from the user's GPUs, beside the in-package study
        from .nnunet_study import score_study

        results["nnunet_study"] = score_study(nnunet_study, progress=progress)
    most_seen = max((r.seen for d in data.values() for m in modalities for r in d.f2d[m].values()), default=0)
    if most_seen > SLICE_RESERVOIR:
        notes.append(f"2D FID and KID use a seeded uniform sample of {SLICE_RESERVOIR} slices per disease, modality, "
                     f"axis and slice subset of each set (the largest such stream had {most_seen}), so their memory is bounded "
                     "whatever the set's size.")
    slices = min(len(_pooled_2d(d, modalities[0], set(d.indices()))) for d in data.values())
    dimensions = 2048 if extractors.inception else None
    if dimensions and slices < dimensions:
        notes.append(f"2D FID from {slices} slices per set in {dimensions} Inception dimensions: the covariance is "
                     "rank-deficient and FID is biased upwards at this count; compare sets within this report, "
                     "not with published FIDs (KID is unbiased).")
    dimensions_3d = (extractors.network_3d.dimensions if extractors.network_3d is not None
                     else sum(layer.out_channels for layer in extractors.random_3d.layers))
    if min(results["counts"].values()) < dimensions_3d:
        notes.append(f"3D FID from {min(results['counts'].values())} volumes in {dimensions_3d} dimensions per "
                     "modality: the covariance is rank-deficient and FID is biased upwards at this count (its "
                     "bootstrap interval shows the spread, not the bias); compare sets of equal size within this "
                     "report, beside the references; KID is unbiased.")
    if extractors.inception is None:
        notes.append("2D features are a seeded random CNN (Inception weights not installed): compare sets within "
                     "this report only.")
    if min(results["counts"].values()) < 2:
        notes.append("Fewer than 2 volumes in a set: FID, KID and diversity are not defined and are shown as n/a.")
    results["notes"] = notes

    # 3. Report and figures.
    from .writing import comparison_rows, write_report

    results["comparison"] = comparison_rows(results, names, modalities)
    write_report(out, results, data, names, modalities, real_by_key, segmentation_steps > 0)
    return results
