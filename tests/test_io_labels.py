import gzip

import nibabel as nib
import numpy as np
import pytest

from diffusion_glioma.errors import DataError
from diffusion_glioma.io import atomic_path, load_volume, save_volume
from diffusion_glioma.labels import (BACKGROUND, CAVITY, CORE, CYST, ENHANCING, HEAD, OEDEMA, SCHEMES, add_head,
                                     get_scheme)
from tests.helpers import write_nifti


def test_reads_a_valid_volume(tmp_path):
    array = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    volume = load_volume(write_nifti(tmp_path / "a.nii.gz", array, affine))
    assert volume.shape == (3, 4, 5)
    assert volume.spacing == (2.0, 2.0, 3.0)
    np.testing.assert_array_equal(volume.array, array)


@pytest.mark.parametrize("problem, expected", [
    ("missing", "file not found"),
    ("garbage", "not a readable NIfTI"),
    ("truncated", "truncated or corrupt"),
    ("four_d", "4D image"),
    ("nan", "NaN or Inf"),
    ("empty", "image is empty"),
])
def test_bad_files_give_one_line_naming_the_file(tmp_path, problem, expected):
    path = tmp_path / f"{problem}.nii.gz"
    if problem == "garbage":
        path.write_bytes(b"this is not a nifti file at all" * 20)
    elif problem == "truncated":
        write_nifti(path, np.random.default_rng(0).random((30, 30, 30)))
        raw = gzip.decompress(path.read_bytes())
        path.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    elif problem == "four_d":
        write_nifti(path, np.ones((4, 4, 4, 3)))
    elif problem == "nan":
        array = np.ones((4, 4, 4))
        array[1, 1, 1] = np.nan
        write_nifti(path, array)
    elif problem == "empty":
        write_nifti(path, np.zeros((4, 4, 4)))
    with pytest.raises(DataError) as info:
        load_volume(path)
    message = str(info.value)
    assert message.startswith(str(path)) and expected in message
    assert "\n" not in message


def test_singleton_fourth_dimension_is_accepted(tmp_path):
    volume = load_volume(write_nifti(tmp_path / "a.nii", np.random.default_rng(0).random((4, 5, 6, 1))))
    assert volume.shape == (4, 5, 6)


def test_label_maps_must_hold_integers(tmp_path):
    path = write_nifti(tmp_path / "seg.nii.gz", np.full((4, 4, 4), 0.5))
    with pytest.raises(DataError, match="non-integer"):
        load_volume(path, kind="label")
    zeros = load_volume(write_nifti(tmp_path / "zero.nii.gz", np.zeros((4, 4, 4))), kind="label")
    assert zeros.array.dtype == np.int16 and not zeros.array.any()


def test_save_keeps_affine_and_header_codes(tmp_path):
    affine = np.array([[-1.0, 0, 0, 90], [0, -1.0, 0, 120], [0, 0, 1.0, -70], [0, 0, 0, 1]])
    path = save_volume(tmp_path / "out.nii.gz", np.ones((3, 3, 3)), affine, qform_code=1, sform_code=2)
    img = nib.load(str(path))
    np.testing.assert_allclose(img.affine, affine)
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 2
    assert img.get_data_dtype() == np.float32


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "x.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("scheme, source, common", [
    ("brats2021", [0, 1, 2, 4], [BACKGROUND, CORE, OEDEMA, ENHANCING]),
    ("brats_gli", [0, 1, 2, 3, 4], [BACKGROUND, CORE, OEDEMA, ENHANCING, CAVITY]),
    ("brats_peds", [0, 1, 2, 3, 4], [BACKGROUND, ENHANCING, CORE, CYST, OEDEMA]),
    ("brats_peds_2023", [0, 1, 2, 3], [BACKGROUND, CORE, OEDEMA, ENHANCING]),
])
def test_source_schemes_map_to_common(scheme, source, common):
    mapped = SCHEMES[scheme].to_common(np.array(source))
    assert mapped.tolist() == common
    back = SCHEMES[scheme].from_common(mapped)
    assert back.tolist() == source


def test_unknown_label_names_file_and_values():
    with pytest.raises(DataError) as info:
        SCHEMES["brats2021"].to_common(np.array([0, 1, 3, 7]), "case_seg.nii.gz")
    message = str(info.value)
    assert message.startswith("case_seg.nii.gz") and "[3, 7]" in message and "[0, 1, 3, 7]" in message
    assert "--labels brats2013" in message  # a 3 is what BraTS 2013-2016 files hold: the line names the choice


def test_brats_2013_2016_labels():
    """1 necrosis, 2 oedema, 3 non-enhancing core, 4 enhancing: 1 and 3 are both tumour core (BraTS 2017
    merged them), written back as 1; values 1, 2, 4 mean what they mean in brats2021."""
    mapped = SCHEMES["brats2013"].to_common(np.array([0, 1, 2, 3, 4]))
    assert mapped.tolist() == [BACKGROUND, CORE, OEDEMA, CORE, ENHANCING]
    assert SCHEMES["brats2013"].from_common(mapped).tolist() == [0, 1, 2, 1, 4]
    assert (SCHEMES["brats2013"].to_common(np.array([0, 1, 2, 4])).tolist()
            == SCHEMES["brats2021"].to_common(np.array([0, 1, 2, 4])).tolist())


def test_custom_mapping_and_head():
    scheme = get_scheme({0: 0, 1: 2, 2: 3, 3: 4})
    labels = scheme.to_common(np.array([[0, 1], [2, 3]]))
    head = np.array([[True, False], [True, True]])
    assert add_head(labels, head).tolist() == [[HEAD, CORE], [OEDEMA, ENHANCING]]
    with pytest.raises(DataError, match="not common labels"):
        get_scheme({1: 9})
    with pytest.raises(DataError, match="unknown label scheme"):
        get_scheme("brats1999")
