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
from tests.helpers import assert_weights_readable_like


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
    with pytest.raises(DataError, match="org/not-here: cannot download the model"):
        load_pipeline("org/not-here")  # a hub id, offline


def test_slim_export_is_small_and_samples_the_same(pipeline_dir, tmp_path, group_umask):
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
    (tmp_path / "written.txt").write_text("by open()")
    assert_weights_readable_like(slim, tmp_path / "written.txt")


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_snapshot_download(tmp_path, repos: dict):
    """Stands in for huggingface_hub.snapshot_download: copies the files of a local folder that match
    `allow_patterns` into a snapshot named by a commit, as the hub cache does; unknown repos fail."""
    import fnmatch
    import shutil

    calls = []

    def download(repo_id, revision=None, allow_patterns=None):
        calls.append({"repo_id": repo_id, "revision": revision})
        if repo_id not in repos:
            raise RuntimeError("404 Client Error: Repository Not Found\nfor url ...")
        snapshot = tmp_path / "hub-cache" / f"models--{repo_id.replace('/', '--')}" / "snapshots" / COMMIT
        for path in repos[repo_id].rglob("*"):
            relative = str(path.relative_to(repos[repo_id]))
            if path.is_file() and any(fnmatch.fnmatch(relative, p) for p in allow_patterns):
                (snapshot / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, snapshot / relative)
        return str(snapshot)

    return download, calls


def test_a_hub_model_is_pinned_recorded_and_read_like_a_local_one(pipeline_dir, tmp_path, monkeypatch, phantom_dir):
    import huggingface_hub

    from diffusion_glioma.evaluation.sets import generator_training_cases
    from diffusion_glioma.generate import GenerateOptions, generate_dataset

    download, calls = fake_snapshot_download(tmp_path, {"glioma-lab/demo": pipeline_dir})
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    out = tmp_path / "synthetic"
    generate_dataset("glioma-lab/demo", phantom_dir, out,
                     GenerateOptions(steps=2, sampler="ddim", precision="fp32", limit=1, revision="v1"), progress=False)
    assert calls == [{"repo_id": "glioma-lab/demo", "revision": "v1"}]
    generation = json.loads((out / "generation.json").read_text())
    assert generation["model_hub_id"] == "glioma-lab/demo" and generation["model_revision"] == COMMIT
    assert generation["model_hash"] != "unknown"
    assert json.loads((out / "manifest.jsonl").read_text().splitlines()[0])["model_revision"] == COMMIT
    assert generator_training_cases(out) == {"a", "b"}  # its training.json came with it
    assert not (Path(generation["model"]) / "unet_online").exists()  # what loading needs, not the online weights


def test_a_gan_on_the_hub_loads_as_a_gan_and_offline_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub

    from diffusion_glioma.models.cgan import CGANGenerator
    from diffusion_glioma.pipeline import CGANPipeline

    gan = tmp_path / "gan"
    CGANPipeline(CGANGenerator(volume_shape=(16, 16, 16), noise_dim=8, base_channels=8, levels=2),
                 preprocess={"shape": [16, 16, 16]}).save_pretrained(gan)
    download, calls = fake_snapshot_download(tmp_path, {"glioma-lab/gan": gan})
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    assert isinstance(load_pipeline("glioma-lab/gan"), CGANPipeline)
    from diffusion_glioma.training.common import trained_classes

    trained_classes("glioma-lab/gan", ["none"])  # fine-tuning asks again: the same snapshot, no new download
    assert calls == [{"repo_id": "glioma-lab/gan", "revision": None}]
    with pytest.raises(DataError, match=r"glioma-lab/none: cannot download the model at revision v2 \(404"):
        load_pipeline("glioma-lab/none", revision="v2")
    with pytest.raises(DataError, match="pins a hub model"):
        load_pipeline(gan, revision="v2")


def test_push_is_private_by_default_and_uploads_no_online_weights_or_local_paths(pipeline_dir, tmp_path):
    record = json.loads((pipeline_dir / "training.json").read_text())
    record["config"]["data"]["raw"] = str(tmp_path / "home" / "someone" / "phantom")
    record["config"]["output_dir"] = "/scratch/someone/runs/demo"
    write_json(pipeline_dir / "training.json", record)
    client = RecordingClient()
    push_to_hub(pipeline_dir, "glioma-lab/phantom-demo", client=client)
    assert client.calls[0][1]["private"] is True
    assert not any(name.startswith("unet_online") for name in client.uploaded)
    uploaded = json.loads(client.uploaded["training.json"])
    assert uploaded["config"]["data"]["raw"] == "phantom" and uploaded["config"]["output_dir"] == "demo"
    assert uploaded["cases"] == ["a", "b"]
    assert (pipeline_dir / "unet_online").is_dir() and "someone" in (pipeline_dir / "training.json").read_text()
