"""How few sampling steps are enough: DDIM and DPM-Solver++ at several step counts, scored on held-out
cases with the paired metrics inside the head (SSIM, PSNR, MAE against the real volume of each mask).

    diffusion-glioma phantom --out runs/phantom_heldout --n-adult 4 --n-pediatric 4 --first-index 100
    python scripts/sampler_study.py --model weights/phantom-demo --real runs/phantom_heldout \
        --out runs/sampler_study --samplers ddim dpm++ --steps 10 25 50

For each sampler, every step count is compared with that sampler's largest count on the same masks
and seeds: the mean paired difference with a bootstrap 95% interval over cases. A count is "within
noise" when that interval contains 0. The mean-fill reference (the head's mean intensity everywhere
inside it) and another real case are scored beside them. Outputs: OUT/sampler_study.json,
OUT/sampler_study.md and OUT/sampler_study.png; the sampled sets stay in OUT/<sampler>_<steps>/
(re-running skips finished volumes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from diffusion_glioma.data.layouts import MODALITIES
from diffusion_glioma.errors import DiffusionGliomaError
from diffusion_glioma.evaluation.fidelity import paired_similarity, trivial_references
from diffusion_glioma.evaluation.report import normalised, read_set
from diffusion_glioma.figures import pyplot, save_png
from diffusion_glioma.generate import GenerateOptions, generate_dataset
from diffusion_glioma.io import write_json

METRICS = ("ssim", "psnr", "mae")


def case_scores(real: dict, folder: Path) -> dict[str, dict[str, float]]:
    """Per real case: each metric averaged over the modalities."""
    out = {}
    for item in read_set(folder, MODALITIES):
        volume, _ = normalised(item, MODALITIES)
        truth = real[item.key]
        head = truth.max(axis=0) > 0
        per = [paired_similarity(truth[c], volume[c], head) for c in range(len(MODALITIES))]
        out[item.key] = {k: float(np.mean([p[k] for p in per])) for k in METRICS}
    return out


def reference_scores(real: dict) -> dict[str, dict[str, dict[str, float]]]:
    keys = sorted(real)
    refs = {"mean-fill inside the head": {}, "another real case": {}}
    for i, key in enumerate(keys):
        truth = real[key]
        head = truth.max(axis=0) > 0
        other = next((real[k] for k in keys[i + 1:] + keys[:i] if real[k].shape == truth.shape), None)
        fill = [paired_similarity(truth[c], trivial_references(truth[c], head)["mean-fill inside the head"], head)
                for c in range(len(MODALITIES))]
        refs["mean-fill inside the head"][key] = {k: float(np.mean([p[k] for p in fill])) for k in METRICS}
        if other is not None:
            pair = [paired_similarity(truth[c], other[c], head) for c in range(len(MODALITIES))]
            refs["another real case"][key] = {k: float(np.mean([p[k] for p in pair])) for k in METRICS}
    return refs


def bootstrap_interval(values: np.ndarray, seed: int = 0, draws: int = 2000) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(draws, len(values)), replace=True).mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="pipeline folder")
    parser.add_argument("--real", required=True, help="held-out cases (images and masks) the model never trained on")
    parser.add_argument("--out", required=True)
    parser.add_argument("--samplers", nargs="+", default=["ddim", "dpm++"])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        real = {item.key: normalised(item, MODALITIES)[0] for item in read_set(args.real, MODALITIES)}
        results: dict = {"model": args.model, "real": args.real, "cases": sorted(real), "runs": {}}
        for sampler in args.samplers:
            for steps in sorted(args.steps):
                folder = out / f"{sampler.replace('+', 'p')}_{steps}"
                start = time.perf_counter()
                generate_dataset(args.model, args.real, folder,
                                 GenerateOptions(sampler=sampler, steps=steps, seed=args.seed), progress=True)
                seconds = time.perf_counter() - start
                per_case = case_scores(real, folder)
                results["runs"][f"{sampler} {steps}"] = {"sampler": sampler, "steps": steps, "per_case": per_case,
                                                         "seconds_this_run": round(seconds, 1)}
        results["references"] = {name: {"per_case": per} for name, per in reference_scores(real).items()}
    except DiffusionGliomaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    largest = max(args.steps)
    for entry in [*results["runs"].values(), *results["references"].values()]:
        entry["mean"] = {m: float(np.mean([v[m] for v in entry["per_case"].values()])) for m in METRICS}
    for entry in results["runs"].values():
        anchor = results["runs"][f"{entry['sampler']} {largest}"]["per_case"]
        entry["vs_largest"] = {}
        for m in METRICS:
            diff = np.array([entry["per_case"][c][m] - anchor[c][m] for c in sorted(anchor)])
            low, high = bootstrap_interval(diff, args.seed)
            entry["vs_largest"][m] = {"mean": float(diff.mean()), "ci95": [low, high], "within_noise": low <= 0 <= high}
    for sampler in args.samplers:
        fine = [s for s in sorted(args.steps)
                if all(results["runs"][f"{sampler} {s}"]["vs_largest"][m]["within_noise"] for m in METRICS)]
        results.setdefault("smallest_within_noise", {})[sampler] = fine[0] if fine else largest
    write_json(out / "sampler_study.json", results)

    lines = [f"Held-out cases: {len(real)} ({args.real}); model {args.model}. Paired metrics inside the head, "
             f"averaged over {', '.join(MODALITIES)}; difference to the same sampler at {largest} steps with a "
             "bootstrap 95% interval over cases.", "",
             "| set | SSIM | PSNR (dB) | MAE | SSIM vs largest [95% CI] | PSNR vs largest [95% CI] | within noise |",
             "|---|---|---|---|---|---|---|"]
    for name, entry in results["runs"].items():
        v = entry["vs_largest"]
        ci = lambda m: f"{v[m]['mean']:+.4f} [{v[m]['ci95'][0]:+.4f}, {v[m]['ci95'][1]:+.4f}]"  # noqa: E731
        lines.append(f"| {name} steps | {entry['mean']['ssim']:.4f} | {entry['mean']['psnr']:.2f} | "
                     f"{entry['mean']['mae']:.4f} | {ci('ssim')} | {ci('psnr')} | "
                     f"{'yes' if all(v[m]['within_noise'] for m in METRICS) else 'no'} |")
    for name, entry in results["references"].items():
        lines.append(f"| reference: {name} | {entry['mean']['ssim']:.4f} | {entry['mean']['psnr']:.2f} | "
                     f"{entry['mean']['mae']:.4f} | | | |")
    lines += ["", "Smallest step count within noise of the largest: "
              + ", ".join(f"{s} {n}" for s, n in results["smallest_within_noise"].items())]
    (out / "sampler_study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, m in zip(axes, METRICS):
        for sampler in args.samplers:
            steps = sorted(args.steps)
            means = [results["runs"][f"{sampler} {s}"]["mean"][m] for s in steps]
            ax.plot(steps, means, marker="o", label=sampler)
        for name, entry in results["references"].items():
            ax.axhline(entry["mean"][m], ls="--", lw=1, color="grey")
            ax.text(steps[0], entry["mean"][m], name, fontsize=7, va="bottom", color="grey")
        ax.set_xlabel("sampling steps")
        ax.set_title(f"paired {m.upper()} inside the head", fontsize=9)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, out / "sampler_study.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
