"""Hyper-parameter sweeps: train, generate and evaluate one run per setting, then rank them.

    diffusion-glioma sweep --config configs/cgan.yaml --grid configs/sweep_cgan.yaml --out runs/sweep
    diffusion-glioma sweep ... --print-commands     # one command per run, for a cluster's job array
    diffusion-glioma sweep ... --only 3             # run number 3 alone (what a job array task runs)

The grid file names any config keys (dotted, as on the command line) and their values:

    mode: grid            # every combination; or random: `samples` draws from the combinations
    samples: 8
    seed: 0
    parameters:
      optim.learning_rate: [1.0e-4, 3.0e-4]
      gan.dropout: [0.0, 0.3]
    evaluate:
      real: runs/phantom_heldout   # real cases the generator never trained on: masks to sample, volumes to score
      rank_by: kid_2d              # kid_2d, fid_3d, spread_error, classifier_accuracy; ssim, psnr
      features: auto               # 2D features for KID (auto: Inception when installed)
      sample_steps: 25
      per_mask: 1                  # draws per mask; spread_error needs >= 2 and `truth`
      truth: runs/phantom_heldout_truth   # optional: the masks' same-mask truth draws (phantom --truth-draws)
      segmentation_steps: 0        # > 0 adds the segmentation study and the classifier regimes

Each run trains (resuming), generates from the evaluation masks (resuming) and evaluates; its scores
go to RUN/result.json, so a killed sweep picks up where it stopped. The ranked table goes to
OUT/sweep.md and OUT/sweep.json, a bar chart to OUT/sweep.png.

The default ranking is KID (distribution distance, unbiased). `spread_error` is |log| of the spread of
a mask's draws over the truth's (0: the truth's variety; a collapsed run or a noisy one scores high).
Paired SSIM and PSNR can be named but reward the conditional mean, so they select blur.
"""

from __future__ import annotations

import itertools
import json
import shlex
from pathlib import Path

import numpy as np

from .config import load_yaml
from .errors import DataError
from .io import write_json, write_text

METRICS = {  # name -> higher is better
    "kid_2d": False, "fid_3d": False, "spread_error": False, "classifier_accuracy": True, "ssim": True, "psnr": True}
DEFAULT_RANK = "kid_2d"


def load_grid(path: str | Path) -> dict:
    grid = load_yaml(path)
    parameters = grid.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise DataError(f"{path}: needs a `parameters:` mapping of config keys to lists of values")
    for key, values in parameters.items():
        if not isinstance(values, list) or not values:
            raise DataError(f"{path}: parameters.{key} must be a non-empty list of values")
    if grid.get("mode", "grid") not in ("grid", "random"):
        raise DataError(f"{path}: mode must be grid or random")
    evaluate = grid.get("evaluate") or {}
    if "real" not in evaluate:
        raise DataError(f"{path}: needs evaluate.real, a folder of real cases the runs are scored on")
    if evaluate.get("rank_by", DEFAULT_RANK) not in METRICS:
        raise DataError(f"{path}: evaluate.rank_by must be one of {sorted(METRICS)}")
    return grid


def settings(grid: dict) -> list[dict]:
    """Every combination (grid), or `samples` of them drawn without replacement (random)."""
    keys = list(grid["parameters"])
    combos = [dict(zip(keys, values)) for values in itertools.product(*grid["parameters"].values())]
    if grid.get("mode", "grid") == "random":
        rng = np.random.default_rng(grid.get("seed", 0))
        picks = rng.permutation(len(combos))[: min(int(grid.get("samples", 8)), len(combos))]
        combos = [combos[i] for i in sorted(picks)]
    return combos


def commands(config: str, grid_path: str, out: str, count: int) -> list[str]:
    base = f"diffusion-glioma sweep --config {shlex.quote(config)} --grid {shlex.quote(grid_path)} --out {shlex.quote(out)}"
    return [f"{base} --only {i}" for i in range(count)] + [f"{base}  # after all runs: the ranked table"]


def run_sweep(config: str | Path, grid_path: str | Path, out: str | Path, *, only: int | None = None,
              progress: bool = True) -> dict:
    from .training.config import load_train_config

    grid, out = load_grid(grid_path), Path(out)
    combos = settings(grid)
    if only is not None and not 0 <= only < len(combos):
        raise DataError(f"--only {only}: the sweep has runs 0 to {len(combos) - 1}")
    for i, overrides in enumerate(combos):
        load_train_config(config, {**overrides, "output_dir": str(out / f"run-{i:03d}")})  # every run's config is valid
    results = []
    for i, overrides in enumerate(combos):
        if only is not None and i != only:
            continue
        results.append(_run(config, overrides, out / f"run-{i:03d}", grid["evaluate"], progress))
    if only is not None:
        return {"runs": results}
    return _rank(out, combos, results, grid["evaluate"].get("rank_by", DEFAULT_RANK))


def _run(config, overrides: dict, run_dir: Path, evaluate_spec: dict, progress: bool) -> dict:
    """Train, generate and evaluate one setting (each step resumes); RUN/result.json when done."""
    result_file = run_dir / "result.json"
    if result_file.is_file():
        result = json.loads(result_file.read_text())
        if result["overrides"] != overrides:  # the grid changed under a finished sweep
            raise DataError(f"{result_file}: a run of other settings ({result['overrides']}, this grid asks for "
                            f"{overrides}); choose another --out")
        return result
    from .evaluation.report import evaluate
    from .generate import GenerateOptions, generate_dataset
    from .training.config import load_train_config

    from .training import train_for_config

    train_config = load_train_config(config, {**overrides, "output_dir": str(run_dir / "train")})
    pipeline = train_for_config(train_config, resume=True)
    synthetic = run_dir / "synthetic"
    generate_dataset(pipeline, evaluate_spec["real"], synthetic,
                     GenerateOptions(steps=int(evaluate_spec.get("sample_steps", 25)),
                                     per_mask=int(evaluate_spec.get("per_mask", 1))), progress=progress)
    segmentation_steps = int(evaluate_spec.get("segmentation_steps", 0))
    report = evaluate(evaluate_spec["real"], [synthetic], run_dir / "report", names=["run"],
                      features=evaluate_spec.get("features", "auto"), segmentation_steps=segmentation_steps,
                      truth=evaluate_spec.get("truth"), progress=progress)
    run = report["sets"]["run"]
    modalities = [m for m in run["paired"] if m != "pairs"]
    mean = lambda values: float(np.mean([v for v in values if v is not None])) if any(  # noqa: E731
        v is not None for v in values) else None
    scores = {"ssim": mean([run["paired"][m]["ssim"] for m in modalities]),
              "psnr": mean([run["paired"][m]["psnr"] for m in modalities]),
              "kid_2d": mean([(run["per_modality"][m]["kid_2d"] or {}).get("mean") for m in modalities]),
              "fid_3d": run["fid_3d"], "classifier_accuracy": None,
              "spread_error": (abs(float(np.log(max(spread["mean"], 1e-6))))
                               if (spread := run["conditional"]["spread_ratio"]) else None)}
    regimes = (run.get("segmentation") or {}).get("classification", {}).get("regimes", {})
    if regimes.get("synthetic -> real"):
        scores["classifier_accuracy"] = regimes["synthetic -> real"]["balanced_accuracy"]
    result = {"overrides": overrides, "scores": scores, "run": str(run_dir)}
    write_json(result_file, result)
    return result


def _rank(out: Path, combos: list[dict], results: list[dict], rank_by: str) -> dict:
    higher = METRICS[rank_by]
    score = lambda r: r["scores"].get(rank_by)  # noqa: E731  (a result.json from before a key existed lacks it)
    key = lambda r: (score(r) is None, -(score(r) or 0) if higher else (score(r) or 0))  # noqa: E731
    ranked = sorted(results, key=key)
    summary = {"rank_by": rank_by, "higher_is_better": higher, "runs": ranked}
    names = list(combos[0])
    if "seed" in names and len(names) > 1:
        summary["over_seeds"] = over_seeds(ranked)
    write_json(out / "sweep.json", summary)
    fmt = lambda v: "n/a" if v is None else f"{v:.4g}"  # noqa: E731
    lines = [f"# Sweep: {len(ranked)} runs ranked by {rank_by} ({'higher' if higher else 'lower'} is better)", "",
             "| rank | run | " + " | ".join(names) + " | " + " | ".join(METRICS) + " |",
             "|---|---|" + "---|" * (len(names) + len(METRICS))]
    for rank, r in enumerate(ranked, 1):
        lines.append(f"| {rank} | {Path(r['run']).name} | " + " | ".join(str(r["overrides"][n]) for n in names)
                     + " | " + " | ".join(fmt(r["scores"].get(m)) for m in METRICS) + " |")
    if "over_seeds" in summary:
        others = [n for n in names if n != "seed"]
        lines += ["", "Each setting over its seeds (mean ± sd): a difference smaller than the sd is a reseed's.", "",
                  "| " + " | ".join(others) + " | seeds | " + " | ".join(METRICS) + " |",
                  "|" + "---|" * (len(others) + 1 + len(METRICS))]
        spread = lambda score: "n/a" if score is None else fmt(score["mean"]) + (  # noqa: E731
            f" ± {score['sd']:.2g}" if score["sd"] is not None else "")
        for group in summary["over_seeds"]:
            cells = [spread(group["scores"][m]) for m in METRICS]
            lines.append("| " + " | ".join(str(group["setting"][n]) for n in others)
                         + f" | {len(group['seeds'])} | " + " | ".join(cells) + " |")
    write_text(out / "sweep.md", "\n".join(lines) + "\n")
    _figure(out / "sweep.png", ranked, rank_by)
    return summary


def over_seeds(runs: list[dict]) -> list[dict]:
    """The runs grouped by every setting but `seed`, each metric as mean and sd over the group's seeds,
    in the order the groups first appear."""
    groups: dict[str, dict] = {}
    for r in runs:
        setting = {k: v for k, v in r["overrides"].items() if k != "seed"}
        group = groups.setdefault(json.dumps(setting, sort_keys=True), {"setting": setting, "seeds": [], "runs": []})
        group["seeds"].append(r["overrides"]["seed"])
        group["runs"].append(r)
    from .evaluation.fidelity import mean_and_sd

    out = []
    for group in groups.values():
        scores = {}
        for m in METRICS:
            values = [r["scores"][m] for r in group["runs"] if r["scores"].get(m) is not None]
            scores[m] = mean_and_sd(values) if values else None
        out.append({"setting": group["setting"], "seeds": group["seeds"], "scores": scores})
    return out


def training_curve(run_dir: str | Path) -> tuple[str, list[int], list[float]] | None:
    """(name, steps, values) of a run's training loss from its metrics log: `loss` for the diffusion
    model and the VAE, the generator's `loss_g` for the GANs."""
    log = Path(run_dir) / "train" / "logs" / "metrics.jsonl"
    if not log.is_file():
        return None
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    for name in ("loss", "loss_g"):
        points = [(r["step"], r[name]) for r in records if name in r]
        if points:
            return name, [p[0] for p in points], [p[1] for p in points]
    return None


def _figure(path: Path, ranked: list[dict], rank_by: str) -> None:
    """The ranked scores beside each run's training loss (the same ranking can hide a run that had
    not converged)."""
    from .figures import pyplot, save_png

    plt = pyplot()
    fig, (ax, curves) = plt.subplots(1, 2, figsize=(max(4, 1.4 * len(ranked) + 2) + 4.5, 3.4))
    labels = ["\n".join(f"{k.split('.')[-1]}={v}" for k, v in r["overrides"].items()) for r in ranked]
    ax.bar(range(len(ranked)), [r["scores"].get(rank_by) or 0 for r in ranked], color="tab:orange")
    ax.set_xticks(range(len(ranked)), labels, fontsize=7)
    ax.set_ylabel(rank_by)
    ax.set_title(f"sweep ranked by {rank_by}", fontsize=9)
    for label, r in zip(labels, ranked):
        curve = training_curve(r["run"])
        if curve:
            curves.plot(curve[1], curve[2], label=label.replace("\n", ", "))
            curves.set_ylabel(curve[0])
    curves.set_yscale("log")
    curves.set_xlabel("step")
    curves.set_title("training loss", fontsize=9)
    if curves.lines:
        curves.legend(fontsize=6)
    fig.tight_layout()
    save_png(fig, path)
