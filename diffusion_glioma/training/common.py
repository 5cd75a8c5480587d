"""What every training loop here shares: run folders, data order, checkpoints, figures."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import Sampler

from ..errors import DiffusionGliomaError
from ..io import atomic_path

CHECKPOINT = re.compile(r"checkpoint-(\d+)")


class TrainingError(DiffusionGliomaError):
    """Training cannot go on (diverged, incompatible checkpoint, run folder in use)."""


class StepSampler(Sampler):
    """Dataset indices for a run, as a pure function of (seed, position in the run).

    Epoch e visits the cases in a permutation seeded by (seed, e). Starting at `start` (in samples,
    counted over all processes) gives exactly the indices the uninterrupted run would have drawn,
    which is what makes resume exact without saving data-loader state.
    """

    def __init__(self, num_cases: int, seed: int, start: int, count: int):
        self.num_cases, self.seed, self.start, self.count = num_cases, seed, start, count

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        epoch, permutation = -1, None
        for k in range(self.start, self.start + self.count):
            e, position = divmod(k, self.num_cases)
            if e != epoch:
                epoch = e
                permutation = torch.randperm(self.num_cases, generator=torch.Generator().manual_seed(
                    self.seed * 100_003 + e)).tolist()
            yield permutation[position]


def step_generator(device: torch.device, seed: int, micro_step: int, process: int) -> torch.Generator:
    """The random stream of one micro-step on one process (noise, timesteps, class dropout)."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + micro_step) * 64 + process)
    return generator


def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


def save_checkpoint(accelerator, folder: Path, step: int, total_limit: int) -> Path:
    """`accelerator.save_state` into a temporary folder renamed into place, then prune old ones."""
    target = folder / f"checkpoint-{step}"
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".checkpoint-{step}.partial"
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        for _, old in checkpoints(folder)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


def load_checkpoint(accelerator, path: Path) -> None:
    try:
        accelerator.load_state(str(path))
    except Exception as exc:  # torch, safetensors and accelerate raise many kinds
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise TrainingError(f"{path}: checkpoint cannot be loaded into this model ({reason}); "
                            "it is damaged or was made with another config") from None


def write_run_config(output_dir: Path, config, resume: bool) -> None:
    """Keep the resolved config beside the run; resuming with a different one is refused."""
    path = output_dir / "config.yaml"
    text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    if path.is_file() and resume:
        previous = yaml.safe_load(path.read_text())
        current = yaml.safe_load(text)
        previous.get("optim", {}).pop("steps", None)
        current.get("optim", {}).pop("steps", None)
        if previous != current:
            raise TrainingError(f"{path}: the run was started with another config; resume with the same one "
                                "(only optim.steps may grow) or start a new output_dir")
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def mid_slices_figure(path: Path, volumes: torch.Tensor, labels: torch.Tensor, modalities: list[str],
                      title: str = "") -> Path:
    """Axial slices through the tumour of each sample, every modality beside the mask, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..data.inspect import LABEL_COLOURS

    volumes, labels = volumes.float().cpu().numpy(), labels.cpu().numpy()
    rows, columns = volumes.shape[0], len(modalities) + 1
    fig, axes = plt.subplots(rows, columns, figsize=(2 * columns, 2 * rows), squeeze=False)
    for r in range(rows):
        tumour = labels[r] >= 2
        z = int(np.argwhere(tumour)[:, 2].mean()) if tumour.any() else labels.shape[-1] // 2
        for c, name in enumerate(modalities):
            axes[r, c].imshow(volumes[r, c, :, :, z].T, cmap="gray", origin="lower", vmin=-1, vmax=1)
            if r == 0:
                axes[r, c].set_title(name, fontsize=9)
        overlay = np.zeros((*labels.shape[1:3], 4))
        for value, colour in LABEL_COLOURS.items():
            overlay[labels[r, :, :, z] == value] = (*colour, 1.0)
        overlay[labels[r, :, :, z] == 1] = (0.5, 0.5, 0.5, 1.0)
        axes[r, -1].imshow(overlay.transpose(1, 0, 2), origin="lower")
        if r == 0:
            axes[r, -1].set_title("mask", fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return path
