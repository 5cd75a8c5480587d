"""New, plausible tumour layouts from a folder of real masks.

    diffusion-glioma augment-masks --masks IN --out OUT --per-mask 8

Three operations change the tumour and never the head: a spatial change (shift within the head,
rotation, scaling, elastic deformation through torchio), a transplant (the tumour of another case of
the same disease placed in this head, in the region allowed for the disease) and growth or shrinkage
by morphological operations that keep the sub-regions nested. Every candidate must pass the checks
in `checks.py`; a rejected one is retried with new random draws, and the reasons are counted.
Outputs keep their input's grid, affine, layout and label values, and feed `generate` unchanged
(a `-head` mask is written beside each for label schemes that have no head label). Inputs may lie on
different grids: a transplanted tumour is moved in world millimetres and resampled (nearest) onto the
recipient's grid.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import Field, model_validator
from scipy import ndimage
from tqdm.auto import tqdm

from ..config import StrictModel
from ..data.layouts import Case
from ..errors import ConfigError, DataError
from ..io import Volume, atomic_path, load_volume, save_volume, write_json
from ..provenance import read_sources
from ..labels import (BACKGROUND, BRATS_REGIONS, CAVITY, CORE, CYST, ENHANCING, HEAD, OEDEMA, TUMOUR_LABELS,
                      add_head, get_scheme)
from ..figures import pyplot, save_png
from .checks import CheckSettings, check_layout, core_exposure, layer_contacts, remove_fragments

OPERATIONS = ("spatial", "transplant", "grow_shrink")


class RegionBox(StrictModel):
    """Where a tumour centre may sit, as fractions of the head's bounding box (RAS): `x` is the
    distance from the midline over the half-width, `y` runs posterior (0) to anterior (1), `z`
    inferior (0) to superior (1)."""

    x: tuple[float, float]
    y: tuple[float, float]
    z: tuple[float, float]

    def contains(self, rel: np.ndarray) -> bool:
        return all(lo <= v <= hi for v, (lo, hi) in zip(rel, (self.x, self.y, self.z)))


class AugmentConfig(StrictModel):
    per_mask: int = Field(4, ge=1)
    seed: int = 0
    operations: tuple[str, ...] = OPERATIONS
    rotation_degrees: float = Field(20.0, ge=0, le=180)
    scale_range: tuple[float, float] = (0.8, 1.25)
    shift_mm: float = Field(15.0, ge=0)
    elastic_mm: float = Field(3.0, ge=0, description="largest elastic displacement; 0 disables it")
    grow_shrink_mm: tuple[float, float] = (-3.0, 4.0)
    volume_tolerance: tuple[float, float] = Field((0.8, 1.25), description="allowed whole-tumour volume: "
                                                  "these factors times the smallest and largest input volume")
    min_fragment_voxels: int = Field(8, ge=1)
    max_tries: int = Field(25, ge=1, description="candidates drawn per output before giving up")
    regions: dict[str, RegionBox] = {
        # Glioblastoma: hemispheric, supratentorial.
        "glioblastoma": RegionBox(x=(0.15, 0.75), y=(0.15, 0.85), z=(0.45, 0.9)),
        # Diffuse midline glioma: pons / brainstem.
        "pediatric_diffuse_glioma": RegionBox(x=(0.0, 0.12), y=(0.3, 0.6), z=(0.05, 0.4)),
    }

    @model_validator(mode="after")
    def _possible(self):
        unknown = set(self.operations) - set(OPERATIONS)
        if unknown or not self.operations:
            raise ValueError(f"operations must be among {list(OPERATIONS)}, got {list(self.operations)}")
        low, high = self.scale_range
        if not 0 < low <= high:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {[low, high]}")
        if self.grow_shrink_mm[0] > self.grow_shrink_mm[1]:
            raise ValueError(f"grow_shrink_mm must be ordered, got {list(self.grow_shrink_mm)}")
        if not 0 < self.volume_tolerance[0] <= 1 <= self.volume_tolerance[1]:
            raise ValueError(f"volume_tolerance must satisfy 0 < low <= 1 <= high, got {list(self.volume_tolerance)}")
        return self


@dataclass
class InputMask:
    case: Case
    seg: Volume
    common: np.ndarray  # common scheme with head
    head: np.ndarray
    voxel_ml: float
    spacing: np.ndarray

    @property
    def tumour(self) -> np.ndarray:
        return np.isin(self.common, TUMOUR_LABELS)

    def without_tumour(self) -> np.ndarray:
        out = self.common.copy()
        out[self.tumour] = HEAD
        return out


@dataclass
class AugmentSummary:
    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    gave_up: list[str] = field(default_factory=list)
    skipped_done: int = 0

    def lines(self) -> list[str]:
        out = [f"accepted {self.accepted}, already done {self.skipped_done}, rejected "
               f"{sum(self.rejected.values())} candidates"]
        out += [f"  rejected ({reason}): {n}" for reason, n in sorted(self.rejected.items(), key=lambda x: -x[1])]
        out += [f"  gave up on {name} after the maximum tries" for name in self.gave_up]
        return out


def load_inputs(cases: list[Case]) -> list[InputMask]:
    """Read every mask in the common scheme with its head, each on its own grid; each needs a tumour.
    Masks of different shapes, voxel sizes and orientations mix: every operation works in millimetres
    and writes onto the source mask's grid."""
    from ..config import PreprocessConfig
    from ..data.preprocess import check_same_grid, load_case

    inputs = []
    for case in cases:
        seg = load_volume(case.seg, kind="label")
        common = get_scheme(case.labels).to_common(seg.array, case.seg)
        if not case.missing(PreprocessConfig().modalities):
            common = load_case(case, PreprocessConfig()).labels
        elif case.head is not None:
            head = load_volume(case.head, kind="label")
            check_same_grid(head, seg, 1e-3)  # a mask and its own head file must agree
            common = add_head(common, head.array > 0)
        if not (common == HEAD).any():
            raise DataError(f"{case.seg}: no head label and no images or head mask to take it from")
        if not np.isin(common, TUMOUR_LABELS).any():
            raise DataError(f"{case.seg}: mask has no tumour to augment")
        spacing = np.sqrt((seg.affine[:3, :3] ** 2).sum(axis=0))
        inputs.append(InputMask(case, seg, common, common != BACKGROUND, float(np.prod(spacing) / 1000), spacing))
    return inputs


def output_name(case: Case, k: int) -> str:
    """A new case id that the input's layout still recognises."""
    cid = case.case_id
    if case.layout in ("brats_gli", "brats_peds"):
        return f"{cid[:-3]}{100 + k:03d}"  # the timepoint field: BraTS-GLI-00000-101
    if case.layout in ("brats2021", "upenn_gbm", "ucsf_pdgm"):
        return f"{cid}{k:03d}"  # digits appended: BraTS2021_00000001
    return f"{cid}_aug{k:03d}"


def output_files(out: Path, case: Case, name: str) -> dict[str, Path]:
    separators = {"brats_gli": ("-", "seg"), "brats_peds": ("-", "seg"), "brats2021": ("_", "seg"),
                  "upenn_gbm": ("_", "segm"), "ucsf_pdgm": ("_", "tumor_segmentation")}
    if case.layout in separators:
        sep, key = separators[case.layout]
        return {"seg": out / name / f"{name}{sep}{key}.nii.gz", "head": out / name / f"{name}{sep}head.nii.gz"}
    return {"seg": out / f"{name}.nii.gz"}  # plain label maps in the common scheme


def _seed(seed: int, case_id: str, k: int) -> int:
    return int.from_bytes(hashlib.sha256(f"augment/{seed}/{case_id}/{k}".encode()).digest()[:8], "little") >> 1


def relative_position(point_vox: np.ndarray, head: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """A voxel position as fractions of the head's RAS bounding box (x: distance from midline / half-width)."""
    idx = np.argwhere(head)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    low, high = world.min(axis=0), world.max(axis=0)
    p = affine[:3, :3] @ point_vox + affine[:3, 3]
    rel = (p - low) / np.maximum(high - low, 1e-6)
    rel[0] = abs(rel[0] - 0.5) * 2
    return rel


def _tumour_centroid(labels: np.ndarray) -> np.ndarray:
    return np.argwhere(np.isin(labels, TUMOUR_LABELS)).mean(axis=0)


# --- the three operations: each returns a candidate label map (common scheme) and what it did ---

def spatial_change(mask: InputMask, config: AugmentConfig, rng: np.random.Generator):
    from scipy.spatial.transform import Rotation

    affine = mask.seg.affine
    tumour = np.where(mask.tumour, mask.common, 0).astype(np.uint8)
    centre_vox = _tumour_centroid(mask.common)
    centre = affine[:3, :3] @ centre_vox + affine[:3, 3]
    rotation = Rotation.from_rotvec(rng.normal(size=3) / 3 * np.deg2rad(config.rotation_degrees)).as_matrix()
    scale = rng.uniform(*config.scale_range)
    shift = rng.normal(size=3)
    shift = shift / max(np.linalg.norm(shift), 1e-9) * rng.uniform(0, config.shift_mm)
    # World map from the output tumour back to the input one: x_in = R^T (x_out - c - t) / s + c.
    world_out_to_in = np.eye(4)
    world_out_to_in[:3, :3] = rotation.T / scale
    world_out_to_in[:3, 3] = centre - rotation.T @ (centre + shift) / scale
    voxel_map = np.linalg.inv(affine) @ world_out_to_in @ affine
    moved = ndimage.affine_transform(tumour, voxel_map[:3, :3], voxel_map[:3, 3], order=0, mode="constant", cval=0)
    params = {"rotation_degrees": float(np.rad2deg(np.linalg.norm(Rotation.from_matrix(rotation).as_rotvec()))),
              "scale": float(scale), "shift_mm": [round(float(v), 2) for v in shift]}
    if config.elastic_mm > 0:
        moved = _elastic(moved, affine, config.elastic_mm, int(rng.integers(2**31)))
        params["elastic_mm"] = config.elastic_mm
    candidate = mask.without_tumour()
    candidate[moved > 0] = moved[moved > 0]
    return candidate, params


def _elastic(labels: np.ndarray, affine: np.ndarray, max_mm: float, seed: int) -> np.ndarray:
    """torchio's random elastic deformation of a label map (nearest neighbour), seeded."""
    import torch
    import torchio as tio

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        transform = tio.RandomElasticDeformation(num_control_points=7, max_displacement=max_mm, locked_borders=2)
        subject = tio.Subject(tumour=tio.LabelMap(tensor=torch.from_numpy(labels[None].astype(np.int16)), affine=affine))
        return transform(subject)["tumour"].data[0].numpy().astype(np.uint8)


def transplant(mask: InputMask, donors: list[InputMask], config: AugmentConfig, rng: np.random.Generator):
    donors = [d for d in donors if d.case.disease == mask.case.disease and d is not mask] or [mask]
    donor = donors[int(rng.integers(len(donors)))]
    region = config.regions.get(mask.case.disease)
    affine = mask.seg.affine
    head_idx = np.argwhere(mask.head)
    target = None
    for _ in range(200):  # a centre inside the head and the allowed region
        candidate = head_idx[int(rng.integers(len(head_idx)))].astype(float)
        if region is None or region.contains(relative_position(candidate, mask.head, affine)):
            target = candidate
            break
    if target is None:
        return None, {"donor": donor.case.case_id}
    donor_centre = donor.seg.affine[:3, :3] @ _tumour_centroid(donor.common) + donor.seg.affine[:3, 3]
    target_world = affine[:3, :3] @ target + affine[:3, 3]
    world_out_to_in = np.eye(4)
    world_out_to_in[:3, 3] = donor_centre - target_world
    voxel_map = np.linalg.inv(donor.seg.affine) @ world_out_to_in @ affine
    tumour = np.where(donor.tumour, donor.common, 0).astype(np.uint8)
    moved = ndimage.affine_transform(tumour, voxel_map[:3, :3], voxel_map[:3, 3], output_shape=mask.common.shape,
                                     order=0, mode="constant", cval=0)
    candidate = mask.without_tumour()
    candidate[moved > 0] = moved[moved > 0]
    return candidate, {"donor": donor.case.case_id, "target_voxel": [int(v) for v in target]}


def tumour_layers(labels: np.ndarray, spacing: np.ndarray) -> list[int]:
    """Tumour labels from the outermost layer to the innermost: by mean depth inside the whole tumour
    (oedema, then an enhancing rim, then the necrosis it encloses)."""
    tumour = np.isin(labels, TUMOUR_LABELS)
    depth = ndimage.distance_transform_edt(tumour, sampling=spacing)
    present = [v for v in TUMOUR_LABELS if v != CAVITY and (labels == v).any()]
    return sorted(present, key=lambda v: float(depth[labels == v].mean()))


def grow_shrink(mask: InputMask, config: AugmentConfig, rng: np.random.Generator):
    """Grow (or shrink) the tumour by a distance in mm, layer by layer, so that every layer keeps its
    thickness and its place: each label and everything inside it moves its outer surface by the
    distance, and the layers are painted from the outside in. An enhancing rim stays around its
    necrosis, oedema around the core. A shrink that would delete a layer is shortened until every
    layer survives (the distance used is recorded)."""
    wanted = float(rng.uniform(*config.grow_shrink_mm))
    labels, spacing = mask.common, mask.spacing
    if abs(wanted) < spacing.min():  # less than a voxel changes nothing: step by one voxel instead
        wanted = float(np.copysign(spacing.min(), wanted))
    layers = tumour_layers(labels, spacing)

    def morph(region: np.ndarray, distance: float) -> np.ndarray:
        if distance >= 0:
            return ndimage.distance_transform_edt(~region, sampling=spacing) <= distance
        return ndimage.distance_transform_edt(region, sampling=spacing) > -distance

    cavity = labels == CAVITY

    def moved(distance: float) -> np.ndarray:
        candidate = np.where(mask.head, HEAD, BACKGROUND).astype(np.uint8)
        for i, value in enumerate(layers):  # outside in: each layer with everything inside it
            region = np.isin(labels, layers[i:])
            candidate[morph(region, distance) & mask.head] = value
        candidate[cavity] = CAVITY  # a resection cavity does not grow
        return candidate

    for fraction in (1.0, 0.75, 0.5, 0.25):
        mm = wanted * fraction
        if wanted < 0 and abs(mm) < spacing.min() and fraction < 1.0:
            break
        candidate = moved(mm)
        if all((candidate == v).any() for v in layers):
            return candidate, {"distance_mm": round(mm, 2), "asked_mm": round(wanted, 2)}
    return None, {"asked_mm": round(wanted, 2)}  # every shorter shrink still deleted a layer


def augment_masks(masks: str | Path, out: str | Path, config: AugmentConfig, *, layout: str | Path | None = "auto",
                  labels: str | dict | None = None, progress: bool = True) -> AugmentSummary:
    """Write `config.per_mask` new masks per input mask; returns the summary (also in summary.json)."""
    from ..generate import find_masks

    out = Path(out)
    inputs = load_inputs(find_masks(masks, layout, labels))
    sources = read_sources(masks)  # inputs that are themselves derived keep their real case
    volumes = [float(np.isin(m.common, BRATS_REGIONS["WT"]).sum() * m.voxel_ml) for m in inputs]
    settings = CheckSettings(
        min_fragment_voxels=config.min_fragment_voxels,
        volume_range_ml=(min(volumes) * config.volume_tolerance[0], max(volumes) * config.volume_tolerance[1]),
    )
    records_dir = out / ".records"
    summary = AugmentSummary()
    written_rows: list[dict] = []
    bar = tqdm(total=len(inputs) * config.per_mask, desc="augment-masks", unit="mask", disable=not progress)
    for position, mask in enumerate(inputs):
        allowed = set(np.unique(mask.common).tolist())
        exposure = core_exposure(mask.common)
        contacts = layer_contacts(mask.common)
        for k in range(config.per_mask):
            name = output_name(mask.case, k)
            record_path = records_dir / f"{name}.json"
            bar.update(1)
            if record_path.is_file():
                summary.skipped_done += 1
                written_rows.append(json.loads(record_path.read_text()))
                continue
            seed = _seed(config.seed, mask.case.case_id, k)
            rng = np.random.default_rng(seed)
            accepted = None
            for attempt in range(1, config.max_tries + 1):
                operation = config.operations[int(rng.integers(len(config.operations)))]
                if operation == "spatial":
                    candidate, params = spatial_change(mask, config, rng)
                elif operation == "transplant":
                    candidate, params = transplant(mask, inputs, config, rng)
                else:
                    candidate, params = grow_shrink(mask, config, rng)
                reason = None
                if candidate is None:
                    reason = "no allowed location" if operation == "transplant" else "a layer would vanish"
                if reason is None:
                    candidate = remove_fragments(candidate, config.min_fragment_voxels)
                    reason = check_layout(candidate, mask.head, allowed, mask.voxel_ml, exposure, settings, contacts)
                if reason is None and operation == "transplant":
                    region = config.regions.get(mask.case.disease)
                    rel = relative_position(_tumour_centroid(candidate), mask.head, mask.seg.affine)
                    if region is not None and not region.contains(rel):
                        reason = "outside allowed region"
                if reason is None and any(np.array_equal(candidate, other.common) for other in inputs):
                    reason = "copy of an input"
                if reason is None:
                    try:
                        source_values = get_scheme(mask.case.labels).from_common(candidate)
                    except DataError:
                        reason = "labels outside input set"
                if reason is None:
                    accepted = (candidate, source_values, operation, params, attempt)
                    break
                summary.rejected[reason] = summary.rejected.get(reason, 0) + 1
            if accepted is None:
                summary.gave_up.append(name)
                if position < 3 and summary.accepted == 0 and len(summary.gave_up) >= 3:
                    raise ConfigError(
                        f"no candidate passed the checks for {len(summary.gave_up)} outputs in a row "
                        f"({dict(summary.rejected)}); the settings look impossible (scale_range, volume_tolerance, "
                        "regions)")
                continue
            candidate, source_values, operation, params, attempt = accepted
            files = output_files(out, mask.case, name)
            affine, seg = mask.seg.affine, mask.seg
            common_scheme = "seg" in files and "head" not in files
            save_volume(files["seg"], candidate if common_scheme else source_values, affine,
                        qform_code=seg.qform_code, sform_code=seg.sform_code, dtype=np.int16)
            if "head" in files:
                save_volume(files["head"], (candidate != BACKGROUND).astype(np.uint8), affine,
                            qform_code=seg.qform_code, sform_code=seg.sform_code, dtype=np.uint8)
            record = {
                "output": name, "source_mask": str(mask.case.seg), "case_id": mask.case.case_id,
                "derived_from": sources.get(mask.case.case_id, mask.case.case_id),
                "disease": mask.case.disease, "seed": seed, "operation": operation, "params": params,
                "attempts": attempt, "files": {k_: str(p.relative_to(out)) for k_, p in files.items()},
                "stats": layout_stats(candidate, mask),
            }
            write_json(record_path, record)
            written_rows.append(record)
            summary.accepted += 1
    bar.close()
    if summary.accepted + summary.skipped_done == 0:
        raise ConfigError(f"no augmented mask passed the checks ({dict(summary.rejected)}); loosen the settings")
    with atomic_path(out / "manifest.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in sorted(written_rows, key=lambda r: r["output"])))
    write_json(out / "summary.json", {"accepted": summary.accepted, "already_done": summary.skipped_done,
                                      "rejected": summary.rejected, "gave_up": summary.gave_up,
                                      "config": config.model_dump(mode="json")})
    distribution_figure(out / "distributions.png", [layout_stats(m.common, m) for m in inputs],
                        [r["stats"] for r in written_rows])
    return summary


def layout_stats(labels: np.ndarray, mask: InputMask) -> dict:
    wt = np.isin(labels, BRATS_REGIONS["WT"])
    volume = float(wt.sum() * mask.voxel_ml)
    rel = relative_position(_tumour_centroid(labels), mask.head, mask.seg.affine)
    fractions = {name: float((labels == value).sum() / max(wt.sum(), 1))
                 for name, value in (("core", CORE), ("oedema", OEDEMA), ("enhancing", ENHANCING), ("cyst", CYST))}
    return {"volume_ml": round(volume, 3), "centroid_rel": [round(float(v), 3) for v in rel],
            **{f"fraction_{k}": round(v, 3) for k, v in fractions.items()}}


def distribution_figure(path: Path, inputs: list[dict], outputs: list[dict]) -> Path:
    """Inputs vs outputs: tumour volume, centroid position and sub-region fractions."""
    plt = pyplot()

    panels = [("whole-tumour volume (mL)", lambda s: s["volume_ml"]),
              ("centroid |x| from midline (fraction)", lambda s: s["centroid_rel"][0]),
              ("centroid y, posterior to anterior", lambda s: s["centroid_rel"][1]),
              ("centroid z, inferior to superior", lambda s: s["centroid_rel"][2]),
              ("core fraction of WT", lambda s: s["fraction_core"]),
              ("oedema fraction of WT", lambda s: s["fraction_oedema"]),
              ("enhancing fraction of WT", lambda s: s["fraction_enhancing"]),
              ("cyst fraction of WT", lambda s: s["fraction_cyst"])]
    fig, axes = plt.subplots(2, 4, figsize=(14, 6))
    for ax, (title, get) in zip(axes.ravel(), panels):
        a, b = [get(s) for s in inputs], [get(s) for s in outputs]
        bins = np.histogram_bin_edges(a + b, bins=12) if a + b else 10
        ax.hist(a, bins=bins, alpha=0.6, label=f"inputs ({len(a)})", density=True)
        ax.hist(b, bins=bins, alpha=0.6, label=f"augmented ({len(b)})", density=True)
        ax.set_title(title, fontsize=9)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)
