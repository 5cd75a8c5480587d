"""The transfer study: does pretraining on the abundant disease help the rare one?

For each count of target cases, the same loop trains one model from scratch and fine-tunes one from
a model pretrained on the source disease; both sample the held-out target cases' masks, scored
against the real volumes (paired SSIM and PSNR per modality, FID on 3D features when there are
enough cases). `scripts/transfer_study.py` runs it from the command line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data.cache import read_index
from ..data.dataset import CachedCases
from ..errors import DataError
from ..io import write_json
from ..pipeline import load_pipeline
from ..training.config import FinetuneSection, TrainConfig
from ..training.diffusion import train
from .features import RandomFeatures
from .fidelity import frechet_distance, paired_similarity


def _run(base: TrainConfig, output_dir: Path, steps: int, only: list[str], limit: int | None,
         source: Path | None = None) -> Path:
    config = base.model_copy(update={
        "output_dir": output_dir,
        "data": base.data.model_copy(update={"only_diseases": only, "limit_cases": limit, "raw": None, "config": None}),
        "optim": base.optim.model_copy(update={"steps": steps}),
        "finetune": FinetuneSection(source=str(source)) if source else None,
    })
    pipeline = output_dir / "pipeline"
    if (pipeline / "model_index.json").is_file():  # done in an earlier run of the study: resume
        return pipeline
    return train(config, resume=True)


@torch.no_grad()
def score(pipeline_dir: Path, test: CachedCases, target: str, steps: int, seed: int) -> dict:
    pipe = load_pipeline(pipeline_dir).use_sampler("dpm++")
    real, synthetic, heads = [], [], []
    for i in range(len(test)):
        item = test[i]
        generator = [torch.Generator().manual_seed(seed + i)]
        volume = pipe(item["labels"][None], target, num_inference_steps=steps, generator=generator,
                      progress=False).volumes[0]
        real.append((item["image"].float() + 1) / 2)
        heads.append((item["labels"] > 0).numpy())
        synthetic.append((volume + 1) / 2)
    modalities = pipe.modalities
    # Inside the head only (paired_similarity): the background is shared by construction.
    paired = {m: [paired_similarity(r[c].numpy(), s[c].numpy(), h) for r, s, h in zip(real, synthetic, heads)]
              for c, m in enumerate(modalities)}
    features = RandomFeatures(3, len(modalities), seed=0)
    fid = frechet_distance(features(torch.stack(real)), features(torch.stack(synthetic)))
    mean_of = lambda key: float(np.mean([p[key] for m in paired for p in paired[m] if np.isfinite(p[key])]))  # noqa: E731
    return {"ssim": mean_of("ssim"), "psnr": mean_of("psnr"), "mae": mean_of("mae"), "fid_3d": fid,
            "per_modality_ssim": {m: float(np.mean([p["ssim"] for p in paired[m]])) for m in modalities}}


def run_transfer_study(base: TrainConfig, out: str | Path, *, counts: list[int], source: str, target: str,
                       source_steps: int, target_steps: int, test_cases: int = 2, sample_steps: int = 25,
                       seed: int = 0) -> dict:
    out = Path(out)
    if base.data.raw is not None:  # as the training loop does: prepare the raw folder first (resumable)
        from ..config import DataConfig, load_config
        from ..data.cache import prepare_dataset

        data_config = load_config(DataConfig, base.data.config) if base.data.config else DataConfig()
        prepare_dataset(base.data.raw, base.data.cache, data_config, progress=False)
    index = read_index(base.data.cache)
    target_ids = [e["case_id"] for e in index["cases"] if e["disease"] == target and e["has_seg"]]
    if len(target_ids) < test_cases + max(counts):
        raise DataError(f"{base.data.cache}: {len(target_ids)} {target} cases; the study needs {test_cases} held "
                        f"out plus {max(counts)} to train on")
    classes = base.model.disease_classes
    if source not in classes or target not in classes:
        raise DataError(f"model.disease_classes {classes} must hold both {source!r} and {target!r}")
    # Training runs take the first N target cases (data.limit_cases); the last ones are held out.
    held_out = CachedCases(base.data.cache, diseases=classes, case_ids=target_ids[-test_cases:])

    source_model = _run(base, out / "source", source_steps, [source], None)
    results = {"source": source, "target": target, "counts": counts, "held_out": held_out.case_ids,
               "source_steps": source_steps, "target_steps": target_steps, "scratch": {}, "finetuned": {}}
    for count in counts:
        scratch = _run(base, out / f"scratch_{count}", target_steps, [target], count)
        finetuned = _run(base, out / f"finetuned_{count}", target_steps, [target], count, source=source_model)
        # String keys: the same in memory as in transfer.json.
        results["scratch"][str(count)] = score(scratch, held_out, target, sample_steps, seed)
        results["finetuned"][str(count)] = score(finetuned, held_out, target, sample_steps, seed)
    write_json(out / "transfer.json", results)
    _plot(out / "transfer.png", results)
    return results


def _plot(path: Path, results: dict) -> None:
    from ..figures import pyplot, save_png

    plt = pyplot()
    counts = results["counts"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, key, title in zip(axes, ("ssim", "psnr", "fid_3d"), ("paired SSIM (higher is better)",
                                                                  "paired PSNR dB (higher is better)",
                                                                  "FID 3D (lower is better)")):
        for mode, marker in (("scratch", "o"), ("finetuned", "s")):
            values = [results[mode][str(c)][key] for c in counts]
            ax.plot(counts, [v if v is not None else np.nan for v in values], marker=marker,
                    label="fine-tuned from " + results["source"] if mode == "finetuned" else "from scratch")
        if all(results[m][str(c)][key] is None for m in ("scratch", "finetuned") for c in counts):
            ax.text(0.5, 0.5, "n/a: needs at least 2 held-out cases", ha="center", transform=ax.transAxes)
        ax.set_xlabel(f"{results['target']} training cases")
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
