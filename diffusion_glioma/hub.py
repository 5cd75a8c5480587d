"""Model cards, slim exports, fetching pinned models from the Hugging Face Hub and publishing to it.

A hub model is downloaded once (`huggingface_hub.snapshot_download`, at a revision when one is given)
and then read as the local folder it becomes, so its weights' hash, its commit and its `training.json`
are known like a local model's. The hub client and the download function are parameters, so both
paths are tested without a network.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import __version__
from .errors import DataError, DiffusionGliomaError, first_line
from .io import chmod_like_open, write_text
from .labels import COMMON_LABELS

WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"
TAGS = ["medical-imaging", "mri", "diffusion", "3d", "brain-tumour", "synthetic-data", "diffusion_glioma"]


class HubError(DiffusionGliomaError):
    """Publishing or fetching failed (offline, no permission, missing files, unknown revision)."""


HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
# What loading, fine-tuning and provenance read from a pipeline folder: not the online weights
# (`unet_online/`, as large as the model), which only resuming the run that made it needs.
PIPELINE_FILES = ["model_index.json", "training.json", "README.md", "unet/*", "scheduler/*", "generator/*",
                  "discriminator/*", "encoder/*"]


@dataclass(frozen=True)
class ModelSource:
    path: Path  # the local folder (for a hub model, its snapshot in the hub cache)
    hub_id: str | None = None
    revision: str | None = None  # the commit it was downloaded at


def is_hub_id(source: str | Path) -> bool:
    return HUB_ID.fullmatch(str(source)) is not None and not Path(str(source)).exists()


def fetch_model(source: str | Path, revision: str | None = None, download=None) -> ModelSource:
    """A local pipeline folder as it is, or a hub model downloaded at `revision` (default: the main
    branch), with the commit it resolved to."""
    if not is_hub_id(source):
        if revision is not None:
            raise HubError(f"{source}: --revision pins a hub model; this is a local folder")
        if not Path(source).is_dir():
            raise DataError(f"{source}: model folder not found")
        return ModelSource(Path(source))
    key, remembered = (str(source), revision), download is None
    if remembered:
        if key in _FETCHED:  # loading, fine-tuning and provenance each ask: one download per process
            return _FETCHED[key]
        from huggingface_hub import snapshot_download as download
    try:
        path = Path(download(repo_id=str(source), revision=revision, allow_patterns=PIPELINE_FILES))
    except Exception as exc:  # offline, unknown repo or revision, no permission
        at = f" at revision {revision}" if revision else ""
        raise HubError(f"{source}: cannot download the model{at} ({first_line(exc)})") from None
    fetched = ModelSource(path, str(source), path.name)  # the hub cache names a snapshot by its commit
    if remembered:
        _FETCHED[key] = fetched
    return fetched


_FETCHED: dict[tuple[str, str | None], ModelSource] = {}


def _sanitised_training_record(record: dict) -> dict:
    """training.json for the public: paths on the training machine reduced to their last part."""
    def clean(key, value):
        if isinstance(value, dict):
            return {k: clean(k, v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(key, v) for v in value]
        if isinstance(value, str) and ("/" in value or "\\" in value):
            keep = key == "source" and is_hub_id(value)  # finetune.source may name a public hub model
            return value if keep else Path(value).name
        return value

    return {**record, "config": clean("config", record.get("config", {}))}


def count_parameters(weights: Path) -> int:
    """Parameters in a safetensors file, read from its header alone."""
    with weights.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    total = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for size in info["shape"]:
            count *= size
        total += count
    return total


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def model_card(folder: str | Path, *, report: str | Path | None = None, license: str = "apache-2.0",
               trained_on_phantoms: bool | None = None) -> str:
    """A README.md for a pipeline folder, written from what the folder knows."""
    folder = Path(folder)
    index = _read_json(folder / "model_index.json")
    if index.get("_class_name") == "CGANPipeline":
        return _baseline_card(folder, index, report, license)
    unet = _read_json(folder / "unet" / "config.json")
    scheduler = _read_json(folder / "scheduler" / "scheduler_config.json")
    training = _read_json(folder / "training.json")
    if not unet or not (folder / WEIGHTS).is_file():
        raise HubError(f"{folder}: not a pipeline folder (no unet/config.json or {WEIGHTS})")
    config = training.get("config", {})
    cases = training.get("cases", [])
    preprocess = index.get("preprocess") or {}
    data_source = str((config.get("data") or {}).get("raw") or (config.get("data") or {}).get("cache") or "unknown")
    if trained_on_phantoms is None:
        trained_on_phantoms = "phantom" in data_source
    params = count_parameters(folder / WEIGHTS)
    metadata = {
        "license": license,
        "library_name": "diffusers",
        "tags": TAGS + (["phantom"] if trained_on_phantoms else []),
    }
    numbers = _read_json(Path(report)) if report else {}
    labels_seen = training.get("labels_seen") or sorted(COMMON_LABELS)
    lines = [
        "---", yaml.safe_dump(metadata, sort_keys=False).strip(), "---", "",
        f"# {folder.name}: mask-conditioned 3D diffusion model for brain-tumour MRI", "",
        "A `MaskToMRIPipeline` from [diffusion_glioma](https://pypi.org/project/diffusion_glioma/): given a label map "
        "(tumour sub-regions and head) it samples co-registered multi-contrast MRI volumes.", "",
    ]
    if trained_on_phantoms:
        lines += [
            "> **Trained on synthetic phantoms only.** The training data is the package's phantom cohort: template "
            "anatomy with procedurally drawn tumours and simulated contrasts. The model shows the package works end "
            "to end; its samples are not realistic MRI and it must not be used to make data for real studies.", "",
        ]
    lines += [
        "## Model", "",
        f"- Architecture: `DenoiserUNet3D` (volumetric UNet; base width {unet.get('base_channels')}, multipliers "
        f"{unet.get('channel_multipliers')}, residual blocks per level: {unet.get('layers_per_level')}), "
        f"{params / 1e6:.2f} M parameters, "
        + ("diffusing in 3D Haar wavelet space (8 coefficients per modality at half the size per axis; "
           f"mask given as {unet.get('wavelet_mask', 'mean')})." if unet.get("wavelet") else "diffusing in voxel space."),
        f"- Modalities produced, in order: {', '.join(unet.get('modalities', []))}.",
        f"- Disease classes (index 0 = none, for classifier-free guidance): {', '.join(unet.get('disease_classes', []))}.",
        f"- Grid: {preprocess.get('shape')} voxels of {preprocess.get('spacing')} mm, RAS voxel order; intensities "
        f"clipped to percentiles {preprocess.get('clip_percentiles')} in the head and scaled to [-1, 1].",
        f"- Noise schedule: {scheduler.get('_class_name', 'DDPMScheduler')} ({scheduler.get('beta_schedule')}, "
        f"{scheduler.get('num_train_timesteps')} steps), predicting `{scheduler.get('prediction_type')}`.", "",
        "## Conditioning labels (common scheme)", "",
        "| value | meaning | seen in training |", "|---|---|---|",
        *[f"| {v} | {name} | {'yes' if v in labels_seen else 'no'} |" for v, name in COMMON_LABELS.items()], "",
        "## Training", "",
        f"- Data: {len(cases)} cases from `{data_source}`.",
        f"- Steps: {training.get('steps', (config.get('optim') or {}).get('steps', 'unknown'))}, batch size "
        f"{(config.get('optim') or {}).get('batch_size', '?')} per process, learning rate "
        f"{(config.get('optim') or {}).get('learning_rate', '?')}, EMA weights shipped.",
        f"- Recipe: {_recipe(config.get('diffusion') or {}, unet)}.",
        f"- Fine-tuned from: {(config.get('finetune') or {}).get('source', 'no (trained from scratch)')}.", "",
        "## Use", "",
        "```bash",
        f"diffusion-glioma generate --model {folder} --masks MASKS --out OUT --format nnunet --sampler dpm++ --steps 25",
        "```", "",
        "Defaults: DPM-Solver++ with 25 steps, guidance scale 1 (raise it to 2-3 for stronger class features).", "",
    ]
    if numbers:
        lines += ["## Evaluation", "", "```json", json.dumps(numbers, indent=2)[:4000], "```", ""]
    lines += [
        "## Intended use and limitations", "",
        "Research use only: making synthetic training data for segmentation and classification models, and "
        "studying data scarcity. Not for diagnosis or any clinical decision. Synthetic volumes can carry the biases "
        "of the training data and may not show rare appearances; check the evaluation report before relying on them.",
        "", f"Written by diffusion_glioma {__version__}.", "",
    ]
    return "\n".join(lines)


GENERATOR_WEIGHTS = Path("generator") / "diffusion_pytorch_model.safetensors"


def _baseline_card(folder: Path, index: dict, report, license: str) -> str:
    """The card of a GAN or VAE baseline pipeline (a `CGANPipeline` folder)."""
    generator = _read_json(folder / "generator" / "config.json")
    if not generator or not (folder / GENERATOR_WEIGHTS).is_file():
        raise HubError(f"{folder}: not a pipeline folder (no generator/config.json or {GENERATOR_WEIGHTS})")
    training = _read_json(folder / "training.json")
    config = training.get("config", {})
    gan, vae = config.get("gan"), config.get("vae")
    if vae is not None or training.get("kind") == "vae":
        kind = ("mask-conditioned 3D VAE (decoder shipped; latent drawn from N(0, I) when sampling; encoder in "
                "`encoder/`)" + (", trained on healthy tissue only (an anomaly model)" if (vae or {}).get("healthy_only")
                                else ""))
    elif (gan or {}).get("kind") == "pix2pix":
        kind = "pix2pix-style 3D GAN (spectral-norm PatchGAN + L1; discriminator in `discriminator/`)"
    else:
        kind = "conditional 3D GAN (the proposal's BCE cGAN; discriminator in `discriminator/`)"
    data = config.get("data") or {}
    data_source = str(data.get("raw") or data.get("cache") or "unknown")
    numbers = _read_json(Path(report)) if report else {}
    metadata = {"license": license, "library_name": "diffusers",
                "tags": [t for t in TAGS if t != "diffusion"] + ["gan" if vae is None else "vae", "baseline"]
                + (["phantom"] if "phantom" in data_source else [])}
    lines = ["---", yaml.safe_dump(metadata, sort_keys=False).strip(), "---", "",
             f"# {folder.name}: {kind.split(' (')[0]}, a baseline for mask-conditioned brain-tumour MRI", "",
             f"A `CGANPipeline` from diffusion_glioma: a {kind}. It is a baseline the diffusion model is measured "
             "against; `generate --model` samples it like the diffusion model.", "",
             "## Model", "",
             f"- Generator: {count_parameters(folder / GENERATOR_WEIGHTS) / 1e6:.2f} M parameters, base width "
             f"{generator.get('base_channels')}, {generator.get('levels')} upsampling levels, input vector "
             f"{generator.get('noise_dim')}.",
             f"- Modalities: {', '.join(generator.get('modalities', []))}; disease classes: "
             f"{', '.join(generator.get('disease_classes', []))}.",
             f"- Grid: {(index.get('preprocess') or {}).get('shape')} voxels of "
             f"{(index.get('preprocess') or {}).get('spacing')} mm.", "",
             "## Training", "",
             f"- Data: {len(training.get('cases', []))} cases from `{data_source}`; steps: {training.get('steps', '?')}.",
             f"- Fine-tuned from: {(config.get('finetune') or {}).get('source', 'no (trained from scratch)')}.", ""]
    if numbers:
        lines += ["## Evaluation", "", "```json", json.dumps(numbers, indent=2)[:4000], "```", ""]
    lines += ["## Intended use and limitations", "", "Research use only, as a baseline; not for diagnosis.", "",
              f"Written by diffusion_glioma {__version__}.", ""]
    return "\n".join(lines)


def _recipe(diffusion: dict, unet: dict) -> str:
    """The training choices that decide whether a diffusion model samples or regresses, in words."""
    levels = diffusion.get("noise_levels", "uniform")
    if levels == "lognormal":
        levels = (f"EDM log-normal noise levels (log sigma mean {diffusion.get('lognormal_mean', -1.2)}, "
                  f"sd {diffusion.get('lognormal_std', 1.2)})")
    else:
        levels = "noise levels uniform over t"
    weighting = f", min-SNR-{diffusion['snr_gamma']:g} weighting" if diffusion.get("snr_gamma") else ""
    kind = diffusion.get("prediction_type", "v_prediction")
    target = {"sample": "x0-prediction", "v_prediction": "v-prediction", "epsilon": "epsilon-prediction"}.get(kind, kind)
    if unet.get("skip_sigma_data") is not None:
        target += f" with EDM's skip (sigma_data {unet['skip_sigma_data']:g})"
    return (f"{target}, {diffusion.get('loss', 'l2')} loss"
            f"{' inside the head' if diffusion.get('loss_in_head', True) else ''}{weighting}, {levels}"
            f"{', wavelet bands at unit variance' if unet.get('wavelet_band_scale') else ''}")


def write_card(folder: str | Path, **kwargs) -> Path:
    path = Path(folder) / "README.md"
    text = model_card(folder, **kwargs)
    write_text(path, text)
    return path


def export_slim(source: str | Path, target: str | Path, *, half: bool = True) -> Path:
    """A small copy of a pipeline folder for shipping: the EMA weights only (fp16 if `half`), no
    online weights, the scheduler and the facts files; loads with `from_pretrained` as usual."""
    import torch
    from safetensors.torch import load_file, save_file

    source, target = Path(source), Path(target)
    if not (source / WEIGHTS).is_file():
        raise HubError(f"{source}: not a pipeline folder (no {WEIGHTS})")
    tmp = target.with_name(f".{target.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    for rel in ("model_index.json", "training.json", "unet/config.json", "scheduler/scheduler_config.json"):
        if (source / rel).is_file():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / rel, tmp / rel)
    tensors = load_file(str(source / WEIGHTS))
    if half:
        tensors = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
    chmod_like_open(tmp / WEIGHTS)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = True, report: str | Path | None = None,
                client=None, commit_message: str | None = None) -> str:
    """Create the repo (private unless asked otherwise) and upload what loading needs: the pipeline's
    model folders, a fresh model card and a training record without local paths (not `unet_online/`)."""
    folder = Path(folder)
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise HubError("HF_HUB_OFFLINE is set: cannot push to the hub (unset it, or copy the folder by hand)")
    if "/" not in repo_id or repo_id.count("/") != 1:
        raise HubError(f"repo id must be ORG/NAME, got {repo_id!r}")
    write_card(folder, report=report)
    if client is None:
        from huggingface_hub import HfApi

        client = HfApi()
    # Staged inside the folder (a hidden name no upload pattern matches), so pushing needs no write
    # access beside it.
    with tempfile.TemporaryDirectory(prefix=".push-", dir=folder) as staging:
        staged = _stage_for_upload(folder, Path(staging))
        try:
            client.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
            info = client.upload_folder(folder_path=str(staged), repo_id=repo_id, repo_type="model",
                                        commit_message=commit_message
                                        or f"Upload {folder.name} (diffusion_glioma {__version__})")
        except Exception as exc:  # network, authentication and hub errors all end here
            reason = first_line(exc)
            raise HubError(f"cannot push {folder} to {repo_id}: {reason}") from None
    return str(getattr(info, "commit_url", info))


def _stage_for_upload(folder: Path, staging: Path) -> Path:
    """The files of PIPELINE_FILES, hard-linked (else copied), with the training record sanitised."""
    staged = staging / folder.name
    for pattern in PIPELINE_FILES:
        for path in folder.glob(pattern):
            if path.is_file() and not path.name.startswith("."):
                target = staged / path.relative_to(folder)
                target.parent.mkdir(parents=True, exist_ok=True)
                if path.name == "training.json":
                    target.write_text(json.dumps(_sanitised_training_record(json.loads(path.read_text())), indent=2))
                    continue
                try:
                    os.link(path, target)
                except OSError:
                    shutil.copy2(path, target)
    return staged
