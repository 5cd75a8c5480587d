import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from diffusion_glioma.config import PreprocessConfig
from diffusion_glioma.data.layouts import discover_cases
from diffusion_glioma.data.preprocess import (GeometryRecord, find_head, normalise, plan_geometry, prepare_case,
                                              to_model, to_source, write_on_source)
from diffusion_glioma.errors import DataError
from diffusion_glioma.labels import BACKGROUND, TUMOUR_LABELS
from tests.helpers import toy_case, write_nifti


def affine_of(kind: str, shape) -> np.ndarray:
    """Source grids a real dataset may come on: RAS, BraTS-like LPS, and an oblique anisotropic one."""
    affine = np.eye(4)
    if kind == "ras":
        affine[:3, :3] = np.diag([1.5, 1.5, 1.5])
    elif kind == "lps":
        affine[:3, :3] = np.diag([-1.0, -1.0, 1.0])
        affine[:3, 3] = [shape[0] - 1, shape[1] - 1, 0]
    elif kind == "oblique":
        rotation = Rotation.from_euler("zxy", [20, -12, 7], degrees=True).as_matrix()
        # Axis order scrambled too (x<->z), as a sagittal acquisition stored as is.
        permute = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]])
        affine[:3, :3] = rotation @ permute @ np.diag([1.0, 1.2, 2.0])
    affine[:3, 3] += [-20.0, 13.0, 7.0]
    return affine.astype(np.float32).astype(np.float64)  # as a NIfTI header stores it


@pytest.mark.parametrize("kind", ["ras", "lps", "oblique"])
def test_written_back_volume_lands_on_the_source_grid(tmp_path, kind):
    images, seg = toy_case(shape=(20, 22, 18))
    affine = affine_of(kind, seg.shape)
    head = images["t1n"] > 0
    canonical_spacing = nib.affines.voxel_sizes(nib.as_closest_canonical(nib.Nifti1Image(seg, affine)).affine)
    record = plan_geometry(affine, seg.shape, head, (32, 32, 32), tuple(canonical_spacing))

    # The model grid's axes point the RAS way, whatever the source order.
    model_axes = record.model_affine[:3, :3]
    assert (np.abs(model_axes).argmax(axis=0) == [0, 1, 2]).all()
    assert (np.diag(model_axes) > 0).all()

    model_labels = to_model(seg.astype(np.uint8), record, label=True)
    assert set(np.unique(model_labels)) == set(np.unique(seg))
    path = write_on_source(tmp_path / "back.nii.gz", model_labels, record, label=True)
    back = nib.load(str(path))
    assert back.shape == seg.shape
    np.testing.assert_array_equal(back.affine, affine)
    # At the source spacing the map is a permutation, flips and a whole-voxel shift: nothing is lost.
    np.testing.assert_array_equal(np.asarray(back.dataobj), seg)
    image_back = to_source(to_model(images["t2w"], record), record)
    np.testing.assert_allclose(image_back, images["t2w"], atol=1e-5)


@pytest.mark.parametrize("kind", ["lps", "oblique"])
def test_model_affine_maps_voxels_to_the_same_world_points(kind):
    shape = (20, 22, 18)
    affine = affine_of(kind, shape)
    marker = np.zeros(shape, dtype=np.uint8)
    marker[5, 14, 9] = 1
    head = np.ones(shape, dtype=bool)
    record = plan_geometry(affine, shape, head, (40, 40, 40), (0.7, 0.7, 0.7))
    inverse = np.linalg.inv(record.matrix)
    model_index = inverse @ [5, 14, 9, 1]
    world_source = affine @ [5, 14, 9, 1]
    world_model = record.model_affine @ model_index
    np.testing.assert_allclose(world_model, world_source, atol=1e-9)


def test_coarser_model_grid_round_trip_keeps_the_tumour_in_place():
    images, seg = toy_case(shape=(40, 44, 36))
    affine = affine_of("lps", seg.shape)
    record = plan_geometry(affine, seg.shape, images["t1n"] > 0, (24, 24, 24), (2.0, 2.0, 2.0))
    back = to_source(to_model(seg.astype(np.uint8), record, label=True), record, label=True)
    tumour, tumour_back = seg > 0, back > 0
    dice = 2 * (tumour & tumour_back).sum() / (tumour.sum() + tumour_back.sum())
    assert dice > 0.85
    np.testing.assert_allclose(np.argwhere(tumour_back).mean(0), np.argwhere(tumour).mean(0), atol=1.0)


def test_geometry_record_json_round_trip():
    record = plan_geometry(affine_of("oblique", (8, 9, 10)), (8, 9, 10), np.ones((8, 9, 10), bool), (8, 8, 8),
                           (2.0, 2.0, 2.0), qform_code=1, sform_code=2)
    again = GeometryRecord.from_json(record.to_json())
    assert again == record
    np.testing.assert_array_equal(again.model_affine, record.model_affine)


@pytest.mark.parametrize("background", [0.0, -1.0, 250.0])
def test_head_found_whatever_the_background(background):
    images, _ = toy_case(background=background)
    expected = images["t1n"] != background
    head = find_head(list(images.values()), 0.1)
    assert (head == expected).mean() > 0.98


def test_normalise_scales_head_to_unit_range():
    images, _ = toy_case(background=0.0)
    head = images["t1n"] > 0
    out = normalise(images["t1n"] * 700 + 30, head, (0.5, 99.5))
    assert out.min() == -1.0 and out.max() == 1.0
    assert (out[~head] == -1.0).all()
    assert -0.5 < np.median(out[head]) < 0.5


def write_case(root, cid, images, seg, affines=None):
    for m, array in images.items():
        write_nifti(root / cid / f"{cid}-{m}.nii.gz", array, (affines or {}).get(m))
    write_nifti(root / cid / f"{cid}-seg.nii.gz", seg, (affines or {}).get("seg"), dtype=np.int16)


def test_prepare_case_on_model_grid(tmp_path):
    images, seg = toy_case(shape=(30, 32, 28), tumour_values=(2, 1, 3))
    write_case(tmp_path, "BraTS-GLI-00001-000", images, seg)
    (case,) = discover_cases(tmp_path)
    prepared = prepare_case(case, PreprocessConfig(shape=(16, 16, 16), spacing=(2.0, 2.0, 2.0)))
    assert prepared.image.shape == (4, 16, 16, 16) and prepared.labels.shape == (16, 16, 16)
    assert prepared.image.min() >= -1 and prepared.image.max() <= 1
    assert (prepared.image[:, prepared.labels == BACKGROUND] == -1).all()
    assert np.isin(prepared.labels, TUMOUR_LABELS).any()


def test_mismatched_grids_and_tumour_outside_field_of_view(tmp_path):
    images, seg = toy_case(shape=(30, 32, 28))
    shifted = np.eye(4)
    shifted[0, 3] = 2.0
    write_case(tmp_path / "a", "BraTS-GLI-00001-000", images, seg, {"t2f": shifted})
    (case,) = discover_cases(tmp_path / "a", labels="brats2021")
    with pytest.raises(DataError, match="t2f.nii.gz: affine differs"):
        prepare_case(case, PreprocessConfig(shape=(16, 16, 16)))

    write_case(tmp_path / "b", "BraTS-GLI-00001-000", {**images, "t1c": images["t1c"][:-1]}, seg)
    (case,) = discover_cases(tmp_path / "b", labels="brats2021")
    with pytest.raises(DataError, match=r"t1c.nii.gz: shape \(29, 32, 28\) differs"):
        prepare_case(case, PreprocessConfig(shape=(16, 16, 16)))

    write_case(tmp_path / "c", "BraTS-GLI-00001-000", images, seg)
    (case,) = discover_cases(tmp_path / "c", labels="brats2021")
    with pytest.raises(DataError, match="tumour voxels lie outside"):
        prepare_case(case, PreprocessConfig(shape=(8, 8, 8), spacing=(1.0, 1.0, 1.0)))
