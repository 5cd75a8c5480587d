import nibabel as nib
import numpy as np

from diffusion_glioma.data.layouts import discover_cases
from diffusion_glioma.data.phantom import GLIOBLASTOMA, MODALITIES, PEDIATRIC_DMG, make_subject, write_cohort
from diffusion_glioma.labels import CORE, CYST, ENHANCING, OEDEMA


def test_same_seed_same_subject_and_different_seeds_differ():
    a = make_subject(GLIOBLASTOMA, 4.0, 11)
    b = make_subject(GLIOBLASTOMA, 4.0, 11)
    c = make_subject(GLIOBLASTOMA, 4.0, 12)
    np.testing.assert_array_equal(a["images"]["t1c"], b["images"]["t1c"])
    np.testing.assert_array_equal(a["seg"], b["seg"])
    assert not np.array_equal(a["seg"], c["seg"])


def test_contrasts_follow_tissue_physics():
    s = make_subject(GLIOBLASTOMA, 3.0, 3)
    seg = s["seg"]
    t1, t1c, t2, flair = (s["images"][m] for m in MODALITIES)
    enhancing, necrosis, oedema = seg == 3, seg == 1, seg == 2
    assert t1c[enhancing].mean() > 1.5 * t1[enhancing].mean()  # the rim enhances
    assert flair[oedema].mean() > 1.3 * np.median(flair[(seg == 0) & (flair > 0)])  # oedema is FLAIR-bright
    assert t2[necrosis].mean() > t2[enhancing].mean()
    assert (t1[seg == 0] >= 0).all() and (s["images"]["t1n"][0, 0, 0] == 0)  # skull-stripped background


def test_disease_profiles_differ_like_the_real_ones():
    adult = [make_subject(GLIOBLASTOMA, 4.0, i) for i in range(3)]
    child = [make_subject(PEDIATRIC_DMG, 4.0, i) for i in range(3)]
    for s in adult:
        x_mm = s["record"]["centre_mm"][0]
        assert abs(x_mm) > 15  # hemispheric
        assert (s["seg"] == 3).any()  # ring enhancement
    for s in child:
        x, y, z = s["record"]["centre_mm"]
        assert abs(x) < 8 and z < -20  # midline, infratentorial (pons)
        net, enhancing = (s["seg"] == 2).sum(), (s["seg"] == 1).sum()
        assert net > 3 * enhancing  # mostly non-enhancing
    head = lambda s: (s["images"]["t1n"] > 0).sum()  # noqa: E731
    assert np.mean([head(s) for s in child]) < 0.9 * np.mean([head(s) for s in adult])


def test_cohort_in_brats_layout_reads_back(phantom_dir):
    cases = discover_cases(phantom_dir)
    assert [c.layout for c in cases] == ["brats_gli"] * 3 + ["brats_peds"] * 2
    img = nib.load(str(cases[0].images["t1n"]))
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")  # BraTS voxel order
    peds_seg = np.asarray(nib.load(str(cases[-1].seg)).dataobj)
    assert set(np.unique(peds_seg)) <= {0, 1, 2, 3, 4}
    assert (phantom_dir / "phantom_cohort.json").is_file()


def test_cohort_resumes_without_rewriting(tmp_path):
    write_cohort(tmp_path, n_adult=1, n_pediatric=1, spacing=6.0, progress=False)
    first = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.nii.gz")}
    (tmp_path / "BraTS-PED-00000-000" / "BraTS-PED-00000-000-t2f.nii.gz").unlink()
    write_cohort(tmp_path, n_adult=1, n_pediatric=1, spacing=6.0, progress=False)
    again = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.nii.gz")}
    assert set(again) == set(first)
    assert all(again[p] == first[p] for p in first if "GLI" in p.name)
    assert not list(tmp_path.rglob(".*tmp*"))


def test_common_labels_of_each_profile(phantom_dir):
    from diffusion_glioma.config import PreprocessConfig
    from diffusion_glioma.data.preprocess import load_case

    config = PreprocessConfig(shape=(16, 16, 16))
    cases = discover_cases(phantom_dir)
    adult = load_case(cases[0], config).labels
    assert {CORE, OEDEMA, ENHANCING} <= set(np.unique(adult))
    child_labels = set().union(*(set(np.unique(load_case(c, config).labels)) for c in cases[3:]))
    assert CORE in child_labels and child_labels <= {0, 1, CORE, OEDEMA, ENHANCING, CYST}
