import numpy as np
import pytest

from diffusion_glioma.data.layouts import (
    LAYOUTS,
    canonical_modality,
    discover_cases,
    load_layout_file,
    write_label_schemes,
)
from diffusion_glioma.data.preprocess import load_case
from diffusion_glioma.config import PreprocessConfig
from diffusion_glioma.errors import DataError
from diffusion_glioma.labels import CORE, ENHANCING, HEAD, OEDEMA
from tests.helpers import toy_case, write_nifti

CONFIG = PreprocessConfig(shape=(16, 16, 16), spacing=(2.0, 2.0, 2.0))


def write_case(root, names: dict, seg_values=(1, 2, 4), background=0.0, dtype=np.float32, ext=".nii.gz"):
    """Write one toy case; `names` maps modality (or 'seg') to a relative path without extension."""
    images, seg = toy_case(tumour_values=seg_values, background=background)
    for role, rel in names.items():
        array = seg if role == "seg" else images[role]
        write_nifti(root / f"{rel}{ext}", array, dtype=np.int16 if role == "seg" else dtype)


def test_brats2021(tmp_path):
    for cid in ("BraTS2021_00000", "BraTS2021_00002"):
        write_case(tmp_path, {m: f"{cid}/{cid}_{k}" for m, k in
                              [("t1n", "t1"), ("t1c", "t1ce"), ("t2w", "t2"), ("t2f", "flair"), ("seg", "seg")]},
                   ext=".nii")
    cases = discover_cases(tmp_path)
    assert [c.case_id for c in cases] == ["BraTS2021_00000", "BraTS2021_00002"]
    assert cases[0].layout == "brats2021" and cases[0].images["t1c"].name == "BraTS2021_00000_t1ce.nii"
    labels = load_case(cases[0], CONFIG).labels
    assert set(np.unique(labels)) == {0, HEAD, CORE, OEDEMA, ENHANCING}


def test_brats_2023_adult_and_pediatric_side_by_side(tmp_path):
    for cid, values in (("BraTS-GLI-00001-000", (2, 1, 3)), ("BraTS-PED-00003-000", (4, 2, 1))):
        write_case(tmp_path, {m: f"{cid}/{cid}-{m}" for m in ("t1n", "t1c", "t2w", "t2f", "seg")}, seg_values=values)
    gli, ped = discover_cases(tmp_path)
    assert (gli.layout, gli.disease, gli.labels) == ("brats_gli", "glioblastoma", "brats_gli")
    assert (ped.layout, ped.disease, ped.labels) == ("brats_peds", "pediatric_diffuse_glioma", "brats_peds_unstated")
    # The toy tumour is oedema outside, core inside, enhancing at the centre, in each source's own values.
    _, toy = toy_case(tumour_values=(1, 2, 3))
    for case in (gli, ped):
        labels = load_case(case, CONFIG).labels
        assert (labels[toy == 3] == ENHANCING).all()
        assert (labels[toy == 2] == CORE).all() and (labels[toy == 1] == OEDEMA).all()
        assert set(np.unique(labels)) == {0, HEAD, CORE, OEDEMA, ENHANCING}


def test_peds_2023_or_2024_is_never_guessed(tmp_path):
    cid = "BraTS-PED-00007-000"
    write_case(tmp_path, {m: f"{cid}/{cid}-{m}" for m in ("t1n", "t1c", "t2w", "t2f", "seg")}, seg_values=(2, 1, 3))
    with pytest.raises(DataError, match=r"BraTS-PED-00007-000-seg.nii.gz: BraTS-PEDs labels \[0, 1, 2, 3\] fit both.*"
                                        r"--labels brats_peds_2023 or --labels brats_peds_2024"):
        load_case(discover_cases(tmp_path)[0], CONFIG)
    _, toy = toy_case(tumour_values=(2, 1, 3))  # oedema 2, core 1, enhancing 3: the 2023 values
    for stated in ("flag", "file"):
        if stated == "flag":
            case = discover_cases(tmp_path, labels="brats_peds_2023")[0]
        else:
            write_label_schemes(tmp_path, {"brats_peds": "brats_peds_2023"})
            case = discover_cases(tmp_path)[0]
        labels = load_case(case, CONFIG).labels
        assert (labels[toy == 1] == CORE).all() and (labels[toy == 3] == ENHANCING).all()
    (tmp_path / "label_schemes.json").write_text('{"brats_peds": "brats_2023"}')
    with pytest.raises(DataError, match="label_schemes.json: expected"):
        discover_cases(tmp_path)


def test_upenn_gbm_prefers_manual_segmentation(tmp_path):
    cid = "UPENN-GBM-00001_11"
    write_case(tmp_path, {m: f"images_structural/{cid}/{cid}_{k}" for m, k in
                          [("t1n", "T1"), ("t1c", "T1GD"), ("t2w", "T2"), ("t2f", "FLAIR")]})
    write_case(tmp_path, {"seg": f"automated_segm/{cid}_automated_approx_segm"})
    write_case(tmp_path, {"seg": f"images_segm/{cid}_segm"})
    write_case(tmp_path, {"seg": "automated_segm/UPENN-GBM-00002_11_automated_approx_segm",
                          "t1n": "images_structural/UPENN-GBM-00002_11/UPENN-GBM-00002_11_DTI_AD"})
    cases = {c.case_id: c for c in discover_cases(tmp_path, "upenn_gbm")}
    assert cases[cid].seg.name == f"{cid}_segm.nii.gz"
    assert set(cases[cid].images) == {"t1n", "t1c", "t2w", "t2f"}
    # A DTI map is not a structural modality; the automated segmentation alone is used when it is all there is.
    other = cases["UPENN-GBM-00002_11"]
    assert other.images == {} and other.seg.name.endswith("automated_approx_segm.nii.gz")


def test_ucsf_pdgm_prefers_bias_corrected(tmp_path):
    cid = "UCSF-PDGM-0004"
    write_case(tmp_path, {m: f"{cid}_nifti/{cid}_{k}" for m, k in
                          [("t1n", "T1"), ("t1c", "T1c"), ("t2w", "T2"), ("t2f", "FLAIR"), ("seg", "tumor_segmentation")]})
    write_case(tmp_path, {"t1n": f"{cid}_nifti/{cid}_T1_bias", "t2w": f"{cid}_nifti/{cid}_brain_segmentation"})
    (case,) = discover_cases(tmp_path)
    assert case.layout == "ucsf_pdgm" and case.images["t1n"].name == f"{cid}_T1_bias.nii.gz"
    assert case.images["t2w"].name == f"{cid}_T2.nii.gz" and case.seg.name == f"{cid}_tumor_segmentation.nii.gz"


def test_shipped_medddpm_layout_reads_its_files(tmp_path):
    """Med-DDPM keeps one folder per modality, images pre-scaled to [-1, 1] float64 with background -1,
    and labels 1 necrosis, 2 oedema, 3 enhancing tumour, 4 brain (its dataset code's label enum)."""
    from pathlib import Path

    data = tmp_path / "data"
    images, seg = toy_case(tumour_values=(2, 1, 3), background=-1.0)  # oedema, necrosis, enhancing core
    brain = images["t1n"] != -1.0
    seg = np.where(brain & (seg == 0), 4, seg)
    for cid in ("case_a", "case_b"):
        for folder, m in (("t1", "t1n"), ("t1ce", "t1c"), ("t2", "t2w"), ("flair", "t2f")):
            write_nifti(data / folder / f"{cid}.nii.gz", np.clip(images[m] * 2 - 1, -1, 1) * brain - ~brain,
                        dtype=np.float64)
        write_nifti(data / "seg" / f"{cid}.nii.gz", seg, dtype=np.int16)
    spec = Path(__file__).resolve().parents[1] / "configs" / "data" / "layouts" / "medddpm_brats.yaml"
    cases = discover_cases(data, spec)
    assert [c.case_id for c in cases] == ["case_a", "case_b"] and cases[0].disease == "glioblastoma"
    loaded = load_case(cases[0], CONFIG)
    # The head is found against a background of -1, not 0, and label 4 is the brain.
    assert (loaded.head == brain).mean() > 0.98
    assert set(np.unique(loaded.labels)) == {0, HEAD, CORE, OEDEMA, ENHANCING}
    np.testing.assert_array_equal(loaded.labels == HEAD, seg == 4)
    np.testing.assert_array_equal(loaded.labels == ENHANCING, seg == 3)


def test_generic_layout_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("files:\n  t1: t1/case.nii.gz\n")
    with pytest.raises(DataError, match="placeholder"):
        load_layout_file(bad)
    bad.write_text("files:\n  t1: t1/{case}.nii.gz\nlabel: brats2021\n")
    with pytest.raises(DataError, match="unknown keys"):
        load_layout_file(bad)
    bad.write_text("files:\n  dwi: t1/{case}.nii.gz\n")
    with pytest.raises(DataError, match="unknown modality"):
        load_layout_file(bad)


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        discover_cases(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no NIfTI files"):
        discover_cases(tmp_path)
    write_nifti(tmp_path / "scan_001.nii.gz", np.ones((2, 2, 2)))
    with pytest.raises(DataError, match="none matches"):
        discover_cases(tmp_path)


def test_missing_modality_and_images_only_case(tmp_path):
    cid = "BraTS-GLI-00005-000"
    write_case(tmp_path, {m: f"{cid}/{cid}-{m}" for m in ("t1n", "t1c", "t2w")})
    (case,) = discover_cases(tmp_path)
    assert case.seg is None and case.missing(CONFIG.modalities) == ["t2f"]
    with pytest.raises(DataError, match=r"missing modalities \['t2f'\]"):
        load_case(case, CONFIG)
    loaded = load_case(case, PreprocessConfig(modalities=["t1", "t1ce", "t2"], shape=(16, 16, 16)))
    assert loaded.labels is None and loaded.head.any()


def test_modality_aliases():
    assert [canonical_modality(n) for n in ("T1", "t1ce", "T1GD", "T2", "FLAIR")] == ["t1n", "t1c", "t1c", "t2w", "t2f"]
    assert set(LAYOUTS) == {"brats2021", "brats_gli", "brats_peds", "upenn_gbm", "ucsf_pdgm"}
