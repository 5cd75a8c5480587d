"""The shipped demo weights load, describe themselves, and sample."""

from pathlib import Path

import numpy as np
import torch
from huggingface_hub import ModelCard

from diffusion_glioma.generate import GenerateOptions, generate_dataset
from diffusion_glioma.pipeline import MaskToMRIPipeline, load_pipeline

DEMO = Path(__file__).resolve().parents[1] / "weights" / "phantom-demo"


def test_demo_weights_load_and_sample():
    pipe = load_pipeline(DEMO)
    assert isinstance(pipe, MaskToMRIPipeline) and pipe.unet.dtype == torch.float32
    assert pipe.modalities == ["t1n", "t1c", "t2w", "t2f"]
    assert pipe.disease_classes == ["none", "glioblastoma", "pediatric_diffuse_glioma"]
    assert pipe.config.preprocess["shape"] == [64, 80, 64] and pipe.config.preprocess["spacing"] == [3.0, 3.0, 3.0]
    assert pipe.unet.config.wavelet
    size = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert size < 25 * 2**20
    card = ModelCard.load(DEMO / "README.md")
    assert "phantom" in card.data.tags and "Trained on synthetic phantoms only" in card.text
    # An ellipsoidal head at the real grid with a tumour: oedema around enhancing tissue.
    r = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, n) for n in (64, 80, 64)], indexing="ij"))
    labels = ((r / torch.tensor([0.75, 0.8, 0.7])[:, None, None, None]).pow(2).sum(0) < 1).long()[None]
    labels[:, 40:50, 44:54, 36:44] = 3
    labels[:, 42:48, 46:52, 38:42] = 4
    volumes = pipe.use_sampler("dpm++")(labels, "glioblastoma", num_inference_steps=8,
                                         generator=torch.Generator().manual_seed(0), progress=False).volumes
    assert volumes.shape == (1, 4, 64, 80, 64) and torch.isfinite(volumes).all()
    head = labels[0] > 0
    # A trained model, not noise: FLAIR is brighter in the oedema than in the rest of the head.
    flair = volumes[0, 3]
    assert flair[labels[0] == 3].mean() > flair[head & (labels[0] == 1)].mean()


def test_demo_weights_generate_from_phantom_masks(phantom_dir, tmp_path):
    records = generate_dataset(DEMO, phantom_dir, tmp_path / "out", GenerateOptions(limit=1, steps=5), progress=False)
    assert len(records) == 1 and (tmp_path / "out" / "samples.png").stat().st_size > 5000
    import nibabel as nib

    image = nib.load(str(tmp_path / "out" / records[0]["files"]["t1n"]))
    data = np.asarray(image.dataobj)
    assert data.max() > 0.3 and data.min() == 0.0
    # Anatomy, not noise: inside the head the sample follows the real phantom's grey/white/CSF pattern
    # (every phantom is the same template, warped), voxel by voxel.
    real = np.asarray(nib.load(str(next(phantom_dir.glob("BraTS-GLI-00000-000/*-t1n.nii.gz")))).dataobj, dtype=float)
    head = real > 0
    assert records[0]["case_id"] == "BraTS-GLI-00000-000"
    assert np.corrcoef(real[head], data[head])[0, 1] > 0.5
