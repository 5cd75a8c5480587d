"""Mask augmentation: plausible, new, on the input grid, nesting kept, and ready for generate."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from diffusion_glioma.cli import main
from diffusion_glioma.config import load_config, parse_config
from diffusion_glioma.data.layouts import discover_cases
from diffusion_glioma.errors import ConfigError, DataError
from diffusion_glioma.generate import GenerateOptions, generate_dataset
from diffusion_glioma.labels import BRATS_REGIONS, CORE, ENHANCING, HEAD, OEDEMA, SCHEMES, TUMOUR_LABELS
from diffusion_glioma.masks.augment import AugmentConfig, InputMask, augment_masks, grow_shrink, load_inputs
from diffusion_glioma.masks.checks import broken_layers, CheckSettings, check_layout, core_exposure, layer_contacts
from tests.helpers import write_nifti


@pytest.fixture(scope="module")
def augmented(phantom_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("augmented")
    summary = augment_masks(phantom_dir, out, AugmentConfig(per_mask=2, seed=1), progress=False)
    return out, summary


def test_outputs_pass_checks_keep_grid_and_labels_and_are_new(phantom_dir, augmented):
    out, summary = augmented
    assert summary.accepted >= 8 and (out / "distributions.png").stat().st_size > 10_000
    inputs = {m.case.case_id: m for m in load_inputs(discover_cases(phantom_dir))}
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == summary.accepted
    for record in records:
        source = inputs[record["case_id"]]
        seg = nib.load(str(out / record["files"]["seg"]))
        assert seg.shape == source.seg.shape
        np.testing.assert_array_equal(seg.affine, source.seg.affine)
        values = np.asarray(seg.dataobj)
        assert set(np.unique(values)) <= set(np.unique(source.seg.array))  # the input's own label values
        common = SCHEMES[source.case.labels].to_common(values)
        head = np.asarray(nib.load(str(out / record["files"]["head"])).dataobj) > 0
        np.testing.assert_array_equal(head, source.head)  # the head never changes
        common[(common == 0) & head] = HEAD
        settings = CheckSettings(volume_range_ml=(0, 1e9))
        assert check_layout(common, head, set(np.unique(source.common).tolist()), source.voxel_ml,
                            core_exposure(source.common), settings) is None
        for other in inputs.values():
            assert not np.array_equal(common, other.common)
        assert isinstance(record["seed"], int) and record["operation"] in ("spatial", "transplant", "grow_shrink")


def test_transplants_land_in_the_allowed_region(phantom_dir, tmp_path):
    config = AugmentConfig(per_mask=2, operations=["transplant"], seed=3)
    augment_masks(phantom_dir, tmp_path, config, progress=False)
    records = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert records and all(r["operation"] == "transplant" for r in records)
    for record in records:
        region = config.regions[record["disease"]]
        assert region.contains(np.array(record["stats"]["centroid_rel"])), record
        assert record["params"]["donor"] != record["case_id"] or record["disease"] == "pediatric_diffuse_glioma"


@pytest.mark.parametrize("distance", [-3.0, 4.0])
def test_growth_and_shrinkage_keep_nesting(phantom_dir, distance):
    mask = load_inputs(discover_cases(phantom_dir)[:1])[0]
    config = AugmentConfig(grow_shrink_mm=(distance, distance))
    candidate, params = grow_shrink(mask, config, np.random.default_rng(0))
    assert params["asked_mm"] == distance and np.sign(params["distance_mm"]) == np.sign(distance)
    wt = np.isin(candidate, BRATS_REGIONS["WT"])
    tc = np.isin(candidate, BRATS_REGIONS["TC"])
    assert (wt.sum() > np.isin(mask.common, BRATS_REGIONS["WT"]).sum()) == (distance > 0)
    # Enhancing and core lie inside the tumour core's filled extent, the core inside the whole tumour,
    # and oedema still wraps the core (it is mostly not exposed to healthy tissue).
    from scipy import ndimage

    filled_tc = ndimage.binary_fill_holes(tc)
    assert (candidate[candidate == ENHANCING].size == 0) or filled_tc[candidate == ENHANCING].all()
    assert wt[tc].all() and (candidate[wt & ~tc] == OEDEMA).all()
    assert core_exposure(candidate) <= core_exposure(mask.common) + 0.25
    assert not np.isin(candidate, TUMOUR_LABELS)[~mask.head].any()


def ring_tumour(voxel_mm: float, fov_mm: float = 96.0) -> InputMask:
    """Necrosis (r < 9 mm) inside an enhancing rim (to 13.5 mm) inside oedema (to 24 mm), in a
    spherical head of radius 44 mm, on an isotropic grid of `voxel_mm`."""
    n = int(round(fov_mm / voxel_mm))
    r = np.linalg.norm(np.indices((n, n, n)) - (n - 1) / 2, axis=0) * voxel_mm
    labels = np.where(r < 44, HEAD, 0).astype(np.uint8)
    labels[r < 24] = OEDEMA
    labels[r < 13.5] = ENHANCING
    labels[r < 9] = CORE
    return InputMask(None, None, labels, labels > 0, voxel_mm**3 / 1000, np.full(3, voxel_mm))


def equivalent_radius(region: np.ndarray, voxel_mm: float) -> float:
    return float(np.cbrt(3 * region.sum() / (4 * np.pi))) * voxel_mm


@pytest.mark.parametrize("voxel_mm", [1.0, 3.0])  # the native grid and a model grid
@pytest.mark.parametrize("distance", [-3.0, 4.0])
def test_ring_tumours_keep_their_layers(voxel_mm, distance):
    mask = ring_tumour(voxel_mm)
    candidate, params = grow_shrink(mask, AugmentConfig(grow_shrink_mm=(distance, distance)), np.random.default_rng(0))
    assert params["distance_mm"] == distance  # nothing had to be shortened: every layer survives
    assert {CORE, ENHANCING, OEDEMA} <= set(np.unique(candidate).tolist())
    contacts = layer_contacts(candidate)
    assert contacts.get((CORE, OEDEMA), 0) == 0 and contacts.get((CORE, HEAD), 0) == 0  # the rim is closed
    assert broken_layers(candidate, layer_contacts(mask.common), CheckSettings().contact_margin) == []
    # Every surface moved by the distance, so the rim and the oedema keep their thickness.
    radius = lambda labels, values: equivalent_radius(np.isin(labels, values), voxel_mm)  # noqa: E731
    for values in [(CORE,), (CORE, ENHANCING), (CORE, ENHANCING, OEDEMA)]:
        assert abs(radius(candidate, values) - radius(mask.common, values) - distance) <= voxel_mm, values


def test_a_shrink_that_would_delete_a_layer_is_shortened():
    mask = ring_tumour(1.0)
    candidate, params = grow_shrink(mask, AugmentConfig(grow_shrink_mm=(-12.0, -12.0)), np.random.default_rng(0))
    assert params["asked_mm"] == -12.0 and -12.0 < params["distance_mm"] < 0
    assert {CORE, ENHANCING, OEDEMA} <= set(np.unique(candidate).tolist())


def test_the_layer_check_rejects_broken_order():
    mask = ring_tumour(1.0)
    reference = layer_contacts(mask.common)
    r = np.linalg.norm(np.indices(mask.common.shape) - (mask.common.shape[0] - 1) / 2, axis=0)
    shell = mask.common.copy()
    shell[(r >= 13.5) & (r < 16)] = CORE  # a shell of necrosis outside the rim, as growing by label did
    no_rim = mask.common.copy()
    no_rim[no_rim == ENHANCING] = CORE  # the rim eroded away: necrosis against oedema
    settings = CheckSettings()
    for broken in (shell, no_rim):
        allowed = {HEAD, CORE, ENHANCING, OEDEMA}
        assert check_layout(broken, mask.head, allowed, 1e-3, 1.0, settings, reference) == "layer order broken"
    assert check_layout(mask.common, mask.head, {HEAD, CORE, ENHANCING, OEDEMA}, 1e-3, 1.0, settings, reference) is None


def test_augmented_masks_feed_generate_unchanged(augmented, tmp_path):
    out, _summary = augmented
    from diffusion_glioma.io import write_json
    from diffusion_glioma.models.unet3d import build_denoiser
    from diffusion_glioma.pipeline import MaskToMRIPipeline, training_scheduler

    model = tmp_path / "model"
    MaskToMRIPipeline(build_denoiser("tiny"), training_scheduler(),
                      preprocess={"shape": [16, 16, 16], "spacing": [12.0, 12.0, 12.0]}).save_pretrained(model)
    write_json(model / "training.json", {"labels_seen": [0, 1, 2, 3, 4, 6]})
    records = generate_dataset(model, out, tmp_path / "synthetic", GenerateOptions(steps=2, sampler="ddim", limit=3),
                               progress=False)
    assert len(records) == 3
    augmented_from = {r["output"]: r["case_id"] for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    for record in records:  # the real case each volume descends from, through augmentation
        assert record["derived_from"] == augmented_from[record["case_id"]] != record["case_id"]
        img = nib.load(str(tmp_path / "synthetic" / record["files"]["t1n"]))
        seg = nib.load(record["source_mask"])
        assert img.shape == seg.shape and np.allclose(img.affine, seg.affine)


def test_bad_input_and_impossible_settings(phantom_dir, tmp_path, capsys):
    with pytest.raises(ConfigError, match="scale_range must satisfy"):
        parse_config(AugmentConfig, {"scale_range": [1.5, 1.2]})
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["augment-masks", "--masks", str(empty), "--out", str(tmp_path / "o1"), "--quiet"]) == 2
    assert "no NIfTI files" in capsys.readouterr().err
    # A scale that always blows the tumour past the largest input volume can never pass: fail fast.
    impossible = AugmentConfig(per_mask=3, operations=["spatial"], scale_range=(3.0, 3.0), max_tries=4)
    with pytest.raises(ConfigError, match="settings look impossible"):
        augment_masks(phantom_dir, tmp_path / "o2", impossible, progress=False)
    # Mixed grids and tumour-free masks are named.
    mixed = tmp_path / "mixed"
    shutil.copytree(phantom_dir / "BraTS-GLI-00000-000", mixed / "BraTS-GLI-00000-000")
    write_nifti(mixed / "BraTS-GLI-00009-000" / "BraTS-GLI-00009-000-seg.nii.gz", np.zeros((10, 10, 10)), dtype=np.int16)
    write_nifti(mixed / "BraTS-GLI-00009-000" / "BraTS-GLI-00009-000-head.nii.gz", np.ones((10, 10, 10)), dtype=np.int16)
    with pytest.raises(DataError, match="00009-000-seg.nii.gz: mask has no tumour"):
        augment_masks(mixed, tmp_path / "o3", AugmentConfig(), progress=False)
    seg = np.zeros((12, 10, 10))
    seg[4:6, 4:6, 4:6] = 2
    write_nifti(mixed / "BraTS-GLI-00009-000" / "BraTS-GLI-00009-000-seg.nii.gz", seg, dtype=np.int16)
    with pytest.raises(DataError, match=r"00009-000-head.nii.gz: shape \(10, 10, 10\) differs from "
                                        r"BraTS-GLI-00009-000-seg.nii.gz \(12, 10, 10\)"):
        augment_masks(mixed, tmp_path / "o4", AugmentConfig(), progress=False)


def test_masks_on_mixed_grids_keep_their_own_grids(phantom_dir, tmp_path):
    from diffusion_glioma.data.phantom import write_cohort

    mixed = tmp_path / "mixed"
    for cid in ("BraTS-GLI-00000-000", "BraTS-GLI-00001-000"):  # 3 mm
        shutil.copytree(phantom_dir / cid, mixed / cid)
    write_cohort(mixed, n_adult=2, n_pediatric=0, spacing=4.0, first_index=50, progress=False)  # 4 mm, other origin
    config = AugmentConfig(per_mask=2, operations=("transplant",), volume_tolerance=(0.5, 2.0), seed=3, max_tries=100)
    summary = augment_masks(mixed, tmp_path / "out", config, progress=False)
    assert summary.accepted == 8
    records = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    donors_on_other_grids = 0
    for record in records:
        source, out = nib.load(record["source_mask"]), nib.load(str(tmp_path / "out" / record["files"]["seg"]))
        assert out.shape == source.shape and np.allclose(out.affine, source.affine)  # the source's own grid
        donor = next(mixed.glob(f"{record['params']['donor']}/*-seg.nii.gz"))
        donor_img = nib.load(str(donor))
        if not np.allclose(donor_img.header.get_zooms(), source.header.get_zooms()):
            donors_on_other_grids += 1
            # moved in millimetres: the tumour keeps its volume in mL, not in voxels
            ml = lambda img: (np.asarray(img.dataobj) > 0).sum() * np.prod(img.header.get_zooms()) / 1000  # noqa: E731
            assert ml(out) == pytest.approx(ml(donor_img), rel=0.3)
    assert donors_on_other_grids >= 2


def test_shipped_config_is_valid():
    from pathlib import Path

    config = load_config(AugmentConfig, Path(__file__).resolve().parents[1] / "configs" / "augment.yaml")
    assert config.per_mask == 4 and "glioblastoma" in config.regions
