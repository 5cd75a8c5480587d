"""The cGAN baseline: trains without NaNs, varies with the noise, resumes, and feeds generate."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffusion_glioma.cli import main
from diffusion_glioma.generate import GenerateOptions, generate_dataset
from diffusion_glioma.models.cgan import CGANDiscriminator, CGANGenerator
from diffusion_glioma.pipeline import CGANPipeline, load_pipeline
from diffusion_glioma.training import cgan as loop
from diffusion_glioma.training import common
from diffusion_glioma.training.config import load_train_config
from tests.helpers import assert_weights_readable_like, interrupt_after_checkpoint
from tests.test_training import write_config

GAN = {"noise_dim": 8, "base_channels": 8, "levels": 2, "dropout": 0.2}


def gan_config(path, cache, output_dir, **sections):
    return write_config(path, cache, output_dir, **{"gan": GAN, **sections})


def test_generator_varies_with_noise_and_discriminator_judges_the_pair():
    torch.manual_seed(0)
    g = CGANGenerator(volume_shape=(16, 16, 16), noise_dim=8, base_channels=8, levels=2)
    d = CGANDiscriminator(volume_shape=(16, 16, 16), base_channels=8, levels=2)
    labels = torch.ones(2, 16, 16, 16, dtype=torch.long)
    labels[:, 5:9, 5:9, 5:9] = 4
    labels[:, :2] = 0
    out = g(torch.randn(2, 8), labels, torch.tensor([1, 1]))
    assert out.shape == (2, 4, 16, 16, 16) and out.abs().max() <= 1 and (out[:, :, :2] == -1).all()
    assert not torch.allclose(out[0], out[1])  # same mask and class, different noise
    p = d.probability(out, labels, torch.tensor([1, 2]))
    assert p.shape == (2,) and ((p > 0) & (p < 1)).all()
    with pytest.raises(ValueError, match="divisible by 2\\*\\*levels"):
        CGANGenerator(volume_shape=(18, 16, 16), levels=2)


def test_tiny_gan_trains_resumes_and_generates(tiny_cache, phantom_dir, tmp_path, monkeypatch, group_umask):
    straight = gan_config(tmp_path / "a.yaml", tiny_cache, tmp_path / "straight", validation={"every": 12})
    assert main(["train", "--config", str(straight)]) == 0
    metrics = [json.loads(line) for line in (tmp_path / "straight" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 12
    assert all(np.isfinite([m["loss_d"], m["loss_g"], m["sample_diversity"]]).all() for m in metrics)
    assert metrics[-1]["sample_diversity"] > 1e-4  # samples of one mask differ
    assert (tmp_path / "straight" / "validation" / "step-0000012.png").is_file()
    assert_weights_readable_like(tmp_path / "straight" / "pipeline", tmp_path / "straight" / "pipeline" / "training.json")

    restore = interrupt_after_checkpoint(monkeypatch, common, at_step=8)  # the loops' shared bookkeeping saves
    interrupted = gan_config(tmp_path / "b.yaml", tiny_cache, tmp_path / "interrupted", validation={"every": 12})
    with pytest.raises(KeyboardInterrupt):
        loop.train_cgan(load_train_config(interrupted))
    restore()
    loop.train_cgan(load_train_config(interrupted), resume=True)
    a = load_file(str(tmp_path / "straight" / "pipeline" / "generator_online" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "interrupted" / "pipeline" / "generator_online" / "diffusion_pytorch_model.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key

    pipe = load_pipeline(tmp_path / "straight" / "pipeline")
    assert isinstance(pipe, CGANPipeline) and pipe.max_steps is None
    for fmt in ("pairs", "nnunet"):
        records = generate_dataset(tmp_path / "straight" / "pipeline", phantom_dir, tmp_path / fmt,
                                   GenerateOptions(format=fmt, per_mask=2, limit=2), progress=False)
        assert len(records) == 4 and records[0]["sampler"] == "gan" and records[0]["steps"] == 1
    assert (tmp_path / "nnunet" / "Dataset501_SyntheticGlioma" / "dataset.json").is_file()
    # The same evaluation command scores the cGAN's output.
    from diffusion_glioma.evaluation.report import evaluate

    report = evaluate(phantom_dir, [tmp_path / "pairs"], tmp_path / "report", names=["cgan"], max_slices=2,
                      features="random", segmentation_steps=0, progress=False)
    assert report["sets"]["cgan"]["paired"]["pairs"] == 4 and report["sets"]["cgan"]["fid_3d"] > 0


def test_patch_discriminator_is_spectrally_normalised_and_judges_patches():
    from diffusion_glioma.models.cgan import PatchDiscriminator

    torch.manual_seed(0)
    d = PatchDiscriminator(volume_shape=(16, 16, 16), base_channels=8, levels=2).train()
    labels = torch.ones(2, 16, 16, 16, dtype=torch.long)
    for _ in range(30):  # the power iteration converges over forward passes in training mode
        logits = d(torch.rand(2, 4, 16, 16, 16), labels, torch.tensor([1, 2]))
    assert logits.shape == (2, 1, 4, 4, 4)  # one logit per patch
    for block in d.blocks:
        weight = block[0].weight.detach().flatten(1)
        assert torch.linalg.matrix_norm(weight, ord=2) == pytest.approx(1.0, abs=0.05)


def test_pix2pix_trains_with_l1_and_a_gan_fine_tunes_few_shot(tiny_cache, phantom_dir, tmp_path):
    """pix2pix kind: the L1 term falls; then cross-disease adaptation: a GAN pretrained on adults is
    fine-tuned on one pediatric case with FreezeD and L2-SP."""
    source = gan_config(tmp_path / "p.yaml", tiny_cache, tmp_path / "pix2pix", gan={**GAN, "kind": "pix2pix"},
                        data={"only_diseases": ["glioblastoma"]},
                        optim={"steps": 40, "lr_schedule": "constant", "warmup_steps": 0}, validation={"every": 40})
    assert main(["train", "--config", str(source)]) == 0
    metrics = [json.loads(line) for line in (tmp_path / "pix2pix" / "logs" / "metrics.jsonl").read_text().splitlines()]
    first, last = np.mean([m["l1"] for m in metrics[:5]]), np.mean([m["l1"] for m in metrics[-5:]])
    assert last < 0.8 * first, (first, last)
    saved = tmp_path / "pix2pix" / "pipeline" / "discriminator" / "config.json"
    assert json.loads(saved.read_text())["_class_name"] == "PatchDiscriminator"
    from diffusion_glioma.hub import model_card

    assert "pix2pix-style 3D GAN" in model_card(tmp_path / "pix2pix" / "pipeline")

    fine = gan_config(tmp_path / "f.yaml", tiny_cache, tmp_path / "fine", gan={**GAN, "kind": "pix2pix"},
                      data={"only_diseases": ["pediatric_diffuse_glioma"], "limit_cases": 1},
                      finetune={"source": str(tmp_path / "pix2pix" / "pipeline"), "freeze_discriminator_layers": 1,
                                "ewc_weight": 1.0}, optim={"steps": 6})
    assert main(["train", "--config", str(fine)]) == 0
    before = load_file(str(saved.parent / "diffusion_pytorch_model.safetensors"))
    after = load_file(str(tmp_path / "fine" / "pipeline" / "discriminator" / "diffusion_pytorch_model.safetensors"))
    frozen = [k for k in before if k.startswith("blocks.0.") and "original" in k]
    trained = [k for k in before if k.startswith("blocks.1.") and "original" in k]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # FreezeD
    assert any(not torch.equal(before[k], after[k]) for k in trained)
    metrics = [json.loads(line) for line in (tmp_path / "fine" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["source_drift"] >= 0 for m in metrics) and metrics[-1]["source_drift"] > 0
    facts = json.loads((tmp_path / "fine" / "pipeline" / "training.json").read_text())
    assert facts["cases"] == ["BraTS-PED-00000-000"]
    masks = tmp_path / "masks"  # the pediatric case it trained on (the adult masks hold labels it never saw)
    shutil.copytree(phantom_dir / "BraTS-PED-00000-000", masks / "BraTS-PED-00000-000")
    shutil.copy(phantom_dir / "label_schemes.json", masks)
    records = generate_dataset(tmp_path / "fine" / "pipeline", masks, tmp_path / "out", GenerateOptions(per_mask=1),
                               progress=False)
    assert len(records) == 1 and records[0]["disease"] == "pediatric_diffuse_glioma"

    # A bce GAN cannot fine-tune from a pix2pix source, nor any GAN from a diffusion pipeline.
    wrong = gan_config(tmp_path / "w.yaml", tiny_cache, tmp_path / "wrong",
                       finetune={"source": str(tmp_path / "pix2pix" / "pipeline")}, optim={"steps": 2})
    with pytest.raises(Exception, match="PatchDiscriminator, but gan.kind 'bce'"):
        main(["--debug", "train", "--config", str(wrong)])
