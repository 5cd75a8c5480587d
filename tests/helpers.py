"""Small files for tests, written with real naming and real NIfTI headers."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None, dtype=np.float32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=dtype), np.eye(4) if affine is None else affine), str(path))
    return path


def toy_case(shape=(20, 22, 18), seed=0, background=0.0, tumour_values=(1, 2, 4)):
    """A head-like ellipsoid with a three-part tumour: images per modality and a label map."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    r = np.sqrt((grid ** 2).sum(0))
    head = r < 0.8
    tumour_r = np.sqrt(((grid - np.array([0.3, 0.1, 0.0])[:, None, None, None]) ** 2).sum(0))
    seg = np.zeros(shape, dtype=np.int16)
    seg[(tumour_r < 0.35) & head] = tumour_values[0]
    seg[(tumour_r < 0.25) & head] = tumour_values[1]
    seg[(tumour_r < 0.12) & head] = tumour_values[2]
    images = {}
    for m, base in zip(("t1n", "t1c", "t2w", "t2f"), (0.8, 0.7, 0.4, 0.5)):
        img = np.where(head, base + 0.05 * rng.standard_normal(shape) + 0.3 * (seg > 0), background)
        images[m] = img.astype(np.float32)
    return images, seg


def interrupt_after_checkpoint(monkeypatch, loop_module, at_step: int):
    """Make a training loop stop (as on Ctrl-C) right after it saves the checkpoint of `at_step`;
    returns a function that undoes it."""
    real_save = loop_module.save_checkpoint

    def save_then_stop(accelerator, folder, step, limit, clock=None):
        path = real_save(accelerator, folder, step, limit, clock)
        if step == at_step:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(loop_module, "save_checkpoint", save_then_stop)
    return lambda: monkeypatch.setattr(loop_module, "save_checkpoint", real_save)
