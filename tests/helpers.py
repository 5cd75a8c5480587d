"""Small files for tests, written with real naming and real NIfTI headers."""

from __future__ import annotations

import json
import os
import stat
import subprocess
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


# nnunetv2 pulls torchvision, which cannot import beside the CPU torch and then breaks diffusers' imports:
# .ci/run installs it into a venv of its own (kept between runs) and tells the tests where.
NNUNET_PYTHON = Path(os.environ.get("DG_NNUNET_PYTHON") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                     / "diffusion_glioma" / "nnunet-venv" / "bin" / "python")

# nnU-Net's own checks, every one in a single interpreter (each start imports nnunetv2 and torch): `verify`
# is nnU-Net's dataset integrity check; `decode` turns every label file into its regions and decodes them
# with nnU-Net's LabelManager, which must give the file back unchanged.
NNUNET_CHECKS = """
import json, sys
from pathlib import Path
import nibabel as nib, numpy as np

def verify(root):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    verify_dataset_integrity(root, num_processes=1)
    return "ok"

def decode(root):
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    root = Path(root)
    info = json.loads((root / "dataset.json").read_text())
    manager = LabelManager(info["labels"], info.get("regions_class_order"))
    assert manager.has_regions
    checked = 0
    for path in sorted((root / "labelsTr").glob("*.nii.gz")):
        seg = np.asarray(nib.load(str(path)).dataobj).astype(np.int16)
        regions = np.stack([np.isin(seg, np.atleast_1d(r)) for r in manager.foreground_regions]).astype(np.float32)
        decoded = np.asarray(manager.convert_probabilities_to_segmentation(regions))
        if not np.array_equal(decoded, seg):
            return (f"{path.name}: {dict(zip(*np.unique(seg, return_counts=True)))} -> "
                    f"{dict(zip(*np.unique(decoded, return_counts=True)))}")
        checked += 1
    return f"decoded {checked}"

for kind, root in json.loads(sys.argv[1]):
    try:
        result = verify(root) if kind == "verify" else decode(root)
    except BaseException as exc:
        result = f"error: {type(exc).__name__}: {exc}"
    print("CHECK " + json.dumps([kind, root, result]), flush=True)
"""


def nnunet_checks(checks: list[tuple[str, Path]], scratch: Path) -> dict[tuple[str, Path], str]:
    """Run nnU-Net's checks (("verify" or "decode", dataset folder) pairs) in its venv, in one process;
    returns each check's result: "ok" (verify), "decoded N" (decode), else what went wrong."""
    result = subprocess.run([str(NNUNET_PYTHON), "-c", NNUNET_CHECKS, json.dumps([[k, str(r)] for k, r in checks])],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "nnUNet_raw": str(scratch), "nnUNet_preprocessed": str(scratch),
                                 "nnUNet_results": str(scratch)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = [json.loads(line[len("CHECK "):]) for line in result.stdout.splitlines() if line.startswith("CHECK ")]
    return {(kind, Path(root)): outcome for kind, root, outcome in rows}


def assert_weights_readable_like(folder: Path, reference: Path) -> None:
    """Every .safetensors file under `folder` has the mode of `reference`, a file written by a plain open()
    (0666 less the umask), not the 0600 safetensors' own temporary files leave (safetensors#782)."""
    want = stat.S_IMODE(Path(reference).stat().st_mode)
    modes = {str(f): oct(stat.S_IMODE(f.stat().st_mode)) for f in Path(folder).rglob("*.safetensors")}
    assert modes and set(modes.values()) == {oct(want)}, (oct(want), modes)
