"""The VAE baseline (trained through the run machinery, sampled by generate) and the VAE anomaly-
score classifier (known answers, and a healthy-tissue VAE that finds phantom tumours)."""

import json

import numpy as np
import torch

from diffusion_glioma.cli import main
from diffusion_glioma.config import PreprocessConfig
from diffusion_glioma.evaluation.anomaly import anomaly_study, auroc, score_maps
from diffusion_glioma.generate import GenerateOptions, generate_dataset
from tests.helpers import assert_weights_readable_like
from tests.test_training import write_config

VAE = {"latent_dim": 8, "base_channels": 8, "levels": 2}


def test_auroc_and_anomaly_scores_known_answers():
    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert auroc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 0.0
    assert auroc(np.ones(5), np.ones(7)) == 0.5 and auroc(np.array([]), np.ones(2)) is None
    labels = torch.ones(8, 8, 8, dtype=torch.long)
    labels[:, :, :2] = 0
    labels[2:5, 2:5, 3:6] = 3  # oedema: in the whole tumour
    error = np.where(labels.numpy() == 3, 1.0, 0.1) * (labels.numpy() > 0)
    perfect = score_maps([error], [{"labels": labels}], threshold=0.5)
    assert perfect["voxel_auroc"] == 1.0 and perfect["slice_auroc"] == 1.0
    assert perfect["dice"] == 1.0 and perfect["best_dice"] == 1.0
    assert score_maps([1.0 - error], [{"labels": labels}], threshold=0.5)["voxel_auroc"] == 0.0


def test_healthy_tissue_vae_finds_the_tumours(phantom_dir):
    from diffusion_glioma.data.layouts import MODALITIES
    from diffusion_glioma.evaluation.sets import read_set
    from diffusion_glioma.evaluation.segmentation import prepare_items

    items = prepare_items(read_set(phantom_dir, MODALITIES), PreprocessConfig(shape=(16, 16, 16), spacing=(12.0,) * 3))
    trained = anomaly_study({"real": items[:4]}, items[4:], steps=150)["real"]
    untrained = anomaly_study({"real": items[:4]}, items[4:], steps=0)["real"]
    assert trained["voxel_auroc"] > 0.75 and trained["voxel_auroc"] > untrained["voxel_auroc"] + 0.05
    assert 0 <= trained["dice"] <= trained["best_dice"] <= 1


def test_vae_baseline_trains_and_generates(tiny_cache, phantom_dir, tmp_path, group_umask):
    config = write_config(tmp_path / "v.yaml", tiny_cache, tmp_path / "vae", vae=VAE,
                          optim={"steps": 30, "lr_schedule": "constant", "warmup_steps": 0}, validation={"every": 30})
    assert main(["train", "--config", str(config)]) == 0
    metrics = [json.loads(line) for line in (tmp_path / "vae" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert np.mean([m["reconstruction"] for m in metrics[-5:]]) < 0.7 * np.mean([m["reconstruction"] for m in metrics[:5]])
    assert (tmp_path / "vae" / "pipeline" / "encoder" / "config.json").is_file()
    assert json.loads((tmp_path / "vae" / "pipeline" / "training.json").read_text())["kind"] == "vae"
    assert_weights_readable_like(tmp_path / "vae" / "pipeline", tmp_path / "vae" / "pipeline" / "training.json")
    records = generate_dataset(tmp_path / "vae" / "pipeline", phantom_dir, tmp_path / "out",
                               GenerateOptions(per_mask=2, limit=1), progress=False)
    assert len(records) == 2 and (tmp_path / "vae" / "validation" / "step-0000030.png").is_file()
    from diffusion_glioma.hub import model_card

    card = model_card(tmp_path / "vae" / "pipeline")
    assert "mask-conditioned 3D VAE" in card and "- Data: 5 cases" in card
    both = write_config(tmp_path / "b.yaml", tiny_cache, tmp_path / "b", vae=VAE, gan={"noise_dim": 8})
    assert main(["train", "--config", str(both)]) == 2  # one line: either a gan or a vae section
