import nibabel as nib
import numpy as np

from diffusion_glioma.data.layouts import discover_cases
from dataclasses import replace

from scipy import ndimage

from diffusion_glioma.data.phantom import (
    GLIOBLASTOMA,
    MODALITIES,
    PEDIATRIC_DMG,
    _radial_push,
    brain_volume_fraction,
    draw_anatomy,
    make_subject,
    write_cohort,
)
from diffusion_glioma.labels import CORE, CYST, ENHANCING, OEDEMA


def test_same_seed_same_subject_and_different_seeds_differ():
    a = make_subject(GLIOBLASTOMA, 4.0, 11)
    b = make_subject(GLIOBLASTOMA, 4.0, 11)
    c = make_subject(GLIOBLASTOMA, 4.0, 12)
    np.testing.assert_array_equal(a["images"]["t1c"], b["images"]["t1c"])
    np.testing.assert_array_equal(a["seg"], b["seg"])
    assert not np.array_equal(a["seg"], c["seg"])


def test_contrasts_follow_tissue_physics():
    s = make_subject(GLIOBLASTOMA, 3.0, 2)  # a 15 mm tumour: its rim is more than partial volume at 3 mm
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


def _auc(negatives, positives) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    n, p = np.asarray(negatives)[:, None], np.asarray(positives)[None, :]
    return float(((p > n).mean() + 0.5 * (p == n).mean()))


def test_head_size_does_not_give_the_disease_away():
    rng = np.random.default_rng(0)
    adult = [draw_anatomy(GLIOBLASTOMA, rng) for _ in range(400)]
    child = [draw_anatomy(PEDIATRIC_DMG, rng) for _ in range(400)]
    assert all(4 <= c["age_years"] <= 12 and brain_volume_fraction(c["age_years"]) >= 0.85 for c in child)
    volume = lambda people: [p["brain_volume"] for p in people]  # noqa: E731
    assert 0.4 < _auc(volume(adult), volume(child)) < 0.6  # the old 0.82-0.92 head scale gave 1.0
    # The drawn volume is the subject's: head voxels follow it (mass effect and ventricles aside).
    subjects = [make_subject(PEDIATRIC_DMG, 4.0, i) for i in range(3)]
    head = np.array([(s["images"]["t1n"] > 0).sum() for s in subjects], dtype=float)
    drawn = np.array([s["record"]["brain_volume"] for s in subjects])
    np.testing.assert_allclose(head / head.mean(), drawn / drawn.mean(), rtol=0.06)


def test_the_tumour_pushes_tissue_aside():
    still = make_subject(replace(GLIOBLASTOMA, mass_effect=(0.0, 0.0)), 4.0, 5)
    pushed = make_subject(replace(GLIOBLASTOMA, mass_effect=(0.6, 0.6)), 4.0, 5)
    core = lambda s: np.isin(s["seg"], (1, 3))  # noqa: E731  (oedema follows the displaced white matter)
    assert (core(still) == core(pushed)).mean() > 0.999  # same tumour, same place
    # Without mass effect the tumour replaces the tissue it covers; with it, that tissue moves outward,
    # so the healthy brain outside the tumour holds more white matter signal on T1.
    healthy = (still["seg"] == 0) & (still["images"]["t1n"] > 0)
    ring = healthy & (ndimage.distance_transform_edt(still["seg"] == 0) <= 3)  # within 12 mm of it
    assert pushed["images"]["t1n"][ring].sum() != still["images"]["t1n"][ring].sum()
    assert ring.sum() > 50
    displaced = np.abs(pushed["images"]["t1n"] - still["images"]["t1n"])[healthy]
    far = healthy & (ndimage.distance_transform_edt(still["seg"] == 0) > 15)
    assert displaced.mean() > 3 * np.abs(pushed["images"]["t1n"] - still["images"]["t1n"])[far].mean()


def test_radial_push_is_one_to_one_and_local():
    r = np.linspace(0.0, 80.0, 801, dtype=np.float32)
    points = np.zeros((3, r.size, 1, 1), dtype=np.float32)
    points[0, :, 0, 0] = r
    for amount in (-0.5, 0.3, 0.9):
        mapped = _radial_push(points, np.zeros(3), amount, 20.0)[0, :, 0, 0]
        assert np.all(np.diff(mapped) > 0)  # no folding: tissue keeps its order
        assert abs(mapped[-1] - 80.0) < 1e-3  # far away nothing moves
        assert (mapped[50] < r[50]) == (amount > 0)  # pushed out: subject points read from nearer the centre


def test_cohort_in_brats_layout_reads_back(phantom_dir):
    cases = discover_cases(phantom_dir)
    assert [c.layout for c in cases] == ["brats_gli"] * 3 + ["brats_peds"] * 2
    img = nib.load(str(cases[0].images["t1n"]))
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")  # BraTS voxel order
    peds_seg = np.asarray(nib.load(str(cases[-1].seg)).dataobj)
    assert set(np.unique(peds_seg)) <= {0, 1, 2, 3, 4}
    assert (phantom_dir / "phantom_cohort.json").is_file()
    assert [c.labels for c in cases] == ["brats_gli"] * 3 + ["brats_peds_2024"] * 2  # stated, never guessed


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


def test_truth_draws_share_the_mask_bit_for_bit_and_redraw_the_interior_anatomy():
    draws = [make_subject(GLIOBLASTOMA, 4.0, 5, draw=k) for k in range(3)]
    head = draws[0]["images"]["t1n"] > 0
    for other in draws[1:]:
        np.testing.assert_array_equal(other["seg"], draws[0]["seg"])
        np.testing.assert_array_equal(other["images"]["t1n"] > 0, head)  # the same head outline
        np.testing.assert_array_equal(other["affine"], draws[0]["affine"])
    # Inside the brain the anatomy is redrawn, not only the noise: with new noise, bias and signal alone
    # two draws' T2 correlate at 0.97 there; a smooth displacement of the tissue brings that well down,
    # while the draws stay the same kind of brain.
    interior = ndimage.binary_erosion(head, iterations=3) & (draws[0]["seg"] == 0)
    for other in draws[1:]:
        correlation = np.corrcoef(draws[0]["images"]["t2w"][interior], other["images"]["t2w"][interior])[0, 1]
        assert 0.3 < correlation < 0.9, correlation
    again = make_subject(GLIOBLASTOMA, 4.0, 5, draw=1)
    np.testing.assert_array_equal(again["images"]["t2w"], draws[1]["images"]["t2w"])  # a draw is reproducible


def test_write_cohort_writes_truth_draws_as_a_paired_set(tmp_path):
    from diffusion_glioma.evaluation.sets import read_set

    write_cohort(tmp_path / "cohort", n_adult=1, n_pediatric=1, spacing=6.0, seed=3, truth_draws=2,
                 truth_out=tmp_path / "truth", progress=False)
    items = read_set(tmp_path / "truth", MODALITIES)
    assert sorted(i.item_id for i in items) == ["BraTS-GLI-00000-000_syn001", "BraTS-GLI-00000-000_syn002",
                                                "BraTS-PED-00000-000_syn001", "BraTS-PED-00000-000_syn002"]
    for item in items:
        cohort_seg = np.asarray(nib.load(str(item.mask)).dataobj)
        own = np.asarray(nib.load(str(item.images["t1n"]).replace("t1n.nii.gz", "mask.nii.gz")).dataobj)
        np.testing.assert_array_equal(own, cohort_seg)
        assert item.mask.parent.name == item.key and item.source == item.key
