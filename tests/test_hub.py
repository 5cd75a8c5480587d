"""Publishing: cards, slim exports, the upload path through an injected client, offline errors."""

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from diffusion_glioma.cli import main
from diffusion_glioma.errors import DataError
from diffusion_glioma.hub import HubError, count_parameters, export_slim, model_card, push_to_hub
from diffusion_glioma.io import write_json
from diffusion_glioma.models.unet3d import build_denoiser
from diffusion_glioma.pipeline import MaskToMRIPipeline, load_pipeline, training_scheduler


@pytest.fixture
def pipeline_dir(tmp_path) -> Path:
    folder = tmp_path / "phantom-model"
    unet = build_denoiser("tiny")
    torch.nn.init.normal_(unet.conv_out.weight, std=0.05)
    MaskToMRIPipeline(unet, training_scheduler("v_prediction"),
                      preprocess={"shape": [16, 16, 16], "spacing": [12.0, 12.0, 12.0],
                                  "clip_percentiles": [0.5, 99.5]}).save_pretrained(folder)
    unet.save_pretrained(folder / "unet_online")
    write_json(folder / "training.json", {
        "config": {"data": {"raw": "runs/phantom"}, "optim": {"steps": 30, "batch_size": 2, "learning_rate": 0.001}},
        "cases": ["a", "b"], "labels_seen": [0, 1, 2, 3, 4], "steps": 30})
    return folder


class RecordingClient:
    """Stands in for huggingface_hub.HfApi and keeps what it was asked to do."""

    def __init__(self, fail: Exception | None = None):
        self.calls, self.uploaded, self.fail = [], {}, fail

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        if self.fail:
            raise self.fail

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        root = Path(kwargs["folder_path"])
        self.uploaded = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
        return type("CommitInfo", (), {"commit_url": f"https://hub.example/{kwargs['repo_id']}/commit/1"})()


def test_push_uploads_the_folder_with_a_valid_card(pipeline_dir):
    client = RecordingClient()
    url = push_to_hub(pipeline_dir, "glioma-lab/phantom-demo", private=True, client=client)
    assert url.endswith("/commit/1")
    (name, create), (_, upload) = client.calls
    assert name == "create_repo" and create == {"repo_id": "glioma-lab/phantom-demo", "private": True,
                                                "exist_ok": True, "repo_type": "model"}
    assert upload["repo_id"] == "glioma-lab/phantom-demo"
    assert {"model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors", "README.md", "training.json"} <= set(client.uploaded)
    card = ModelCard(client.uploaded["README.md"].decode())
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0" and data["library_name"] == "diffusers"
    assert {"medical-imaging", "mri", "diffusion", "3d", "phantom"} <= set(data["tags"])
    text = card.text
    assert "Trained on synthetic phantoms only" in text and "t1n, t1c, t2w, t2f" in text
    assert "none, glioblastoma, pediatric_diffuse_glioma" in text and "not for diagnosis" in text.lower()
    params = count_parameters(pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert params == sum(p.numel() for p in build_denoiser("tiny").parameters())
    assert f"{params / 1e6:.2f} M parameters" in text and "voxel space" in text


def test_card_of_a_wavelet_model_says_so(tmp_path):
    unet = build_denoiser("tiny", wavelet=True)
    MaskToMRIPipeline(unet, training_scheduler(value_range=unet.value_range),
                      preprocess={"shape": [16, 16, 16]}).save_pretrained(tmp_path)
    assert "3D Haar wavelet space" in model_card(tmp_path)


def test_card_carries_evaluation_numbers(pipeline_dir, tmp_path):
    report = write_json(tmp_path / "report.json", {"fid_axial_t1c": 12.5})
    assert '"fid_axial_t1c": 12.5' in model_card(pipeline_dir, report=report)


def test_push_errors_are_one_line(pipeline_dir, monkeypatch, capsys):
    with pytest.raises(HubError, match="cannot push .* to org/x: 401 Unauthorized"):
        push_to_hub(pipeline_dir, "org/x", client=RecordingClient(fail=RuntimeError("401 Unauthorized\nmore")))
    with pytest.raises(HubError, match="ORG/NAME"):
        push_to_hub(pipeline_dir, "just-a-name", client=RecordingClient())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["push", "--model", str(pipeline_dir), "--repo-id", "org/x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: HF_HUB_OFFLINE is set") and len(err.strip().splitlines()) == 1
    with pytest.raises(DataError, match="org/not-here: cannot load the model"):
        load_pipeline("org/not-here")  # a hub id, offline


def test_slim_export_is_small_and_samples_the_same(pipeline_dir, tmp_path):
    slim = export_slim(pipeline_dir, tmp_path / "slim")
    assert not (slim / "unet_online").exists()
    full_size = (pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert (slim / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size < 0.6 * full_size
    a, b = load_pipeline(pipeline_dir), load_pipeline(slim)
    assert b.unet.dtype == torch.float32
    labels = torch.ones(1, 16, 16, 16, dtype=torch.long)
    run = lambda p: p(labels, 1, num_inference_steps=3, generator=torch.Generator().manual_seed(0),  # noqa: E731
                      progress=False).volumes
    torch.testing.assert_close(run(a), run(b), atol=2e-2, rtol=0)
    assert json.loads((slim / "training.json").read_text())["steps"] == 30
