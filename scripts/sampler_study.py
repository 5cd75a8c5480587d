"""How few sampling steps are enough: samplers at several step counts, scored on held-out phantoms
by what a sampler must keep (the variety of a mask's draws and their likeness to the anatomy), not by
paired similarity (which rewards the conditional mean, so it cannot tell few steps that blur from
many that sample).

    diffusion-glioma phantom --out runs/phantom_heldout --n-adult 4 --n-pediatric 4 --first-index 100 \
        --spacing 3 --truth-draws 4 --truth-out runs/phantom_heldout_truth
    python scripts/sampler_study.py --model weights/phantom-demo --real runs/phantom_heldout \
        --truth runs/phantom_heldout_truth --out runs/sampler_study --samplers dpm++ --steps 10 25 50

Each setting samples --draws volumes per held-out mask (`generate --per-mask`). Per case: the spread
of the draws over the truth's same-mask spread, the two-draw ratio and the mean correlation of a draw
with the real case (evaluation/conditional.py); per setting, FID and KID 3D against the real cases
(`evaluate`, seeded random 3D features) beside the truth draws' own. Every step count is compared
with the same sampler's largest on the same masks and seeds: the mean per-case difference with a
bootstrap 95% interval; a count is "within noise" when the intervals of the spread ratio and of the
correlation both contain 0. Outputs: OUT/sampler_study.{json,md,png}; the sampled sets stay in
OUT/<sampler>_<steps>/ (re-running skips finished volumes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from diffusion_glioma.data.layouts import MODALITIES
from diffusion_glioma.errors import DiffusionGliomaError
from diffusion_glioma.evaluation.conditional import correlation_with_real, two_draw_ratio, voxelwise_spread
from diffusion_glioma.evaluation.report import evaluate
from diffusion_glioma.evaluation.segmentation import bootstrap_interval
from diffusion_glioma.evaluation.sets import head_of, normalised, read_set
from diffusion_glioma.figures import pyplot, save_png
from diffusion_glioma.generate import GenerateOptions, generate_dataset
from diffusion_glioma.io import write_json, write_text

METRICS = ("spread_ratio", "two_draw_ratio", "correlation_with_real")
DECIDING = ("spread_ratio", "correlation_with_real")  # a step count must keep both


def draws_by_case(folder: Path) -> dict[str, np.ndarray]:
    """{case: (draw, modality, x, y, z)} of a set, normalised as `evaluate` does."""
    out: dict[str, list] = {}
    for item in read_set(folder, MODALITIES):
        out.setdefault(item.key, []).append(normalised(item, MODALITIES)[0])
    return {key: np.stack(volumes) for key, volumes in out.items()}


def case_scores(real: dict, truth_spread: dict, draws: dict) -> dict[str, dict[str, float]]:
    out = {}
    for key, volumes in draws.items():
        head = head_of(real[key])
        out[key] = {"spread_ratio": voxelwise_spread(volumes, head) / truth_spread[key],
                    "two_draw_ratio": two_draw_ratio(volumes[0], volumes[1], real[key], head),
                    "correlation_with_real": float(np.mean([correlation_with_real(v, real[key], head)
                                                            for v in volumes]))}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="pipeline folder")
    parser.add_argument("--real", required=True, help="held-out phantoms (images and masks) the model never trained on")
    parser.add_argument("--truth", required=True, help="their same-mask truth draws (phantom --truth-draws)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--samplers", nargs="+", default=["dpm++"])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--draws", type=int, default=4, help="draws per mask (at least 2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.draws < 2:
        sys.exit("--draws must be at least 2: the spread of one draw is not defined")
    try:
        real = {item.key: normalised(item, MODALITIES)[0] for item in read_set(args.real, MODALITIES)}
        truth = {k: v for k, v in draws_by_case(Path(args.truth)).items() if k in real}
        if not truth:
            raise DiffusionGliomaError(f"{args.truth}: no truth draws of the cases in {args.real}")
        truth_spread = {k: voxelwise_spread(v, head_of(real[k])) for k, v in truth.items()}
        results: dict = {"model": args.model, "real": args.real, "truth": args.truth, "cases": sorted(truth),
                         "draws": args.draws, "runs": {}}
        folders = {}
        for sampler in args.samplers:
            for steps in sorted(args.steps):
                name = f"{sampler} {steps}"
                folder = folders[name] = out / f"{sampler.replace('+', 'p')}_{steps}"
                start = time.perf_counter()
                generate_dataset(args.model, args.real, folder, GenerateOptions(
                    sampler=sampler, steps=steps, seed=args.seed, per_mask=args.draws), progress=True)
                per_case = case_scores(real, truth_spread, {k: v for k, v in draws_by_case(folder).items()
                                                            if k in truth})
                results["runs"][name] = {"sampler": sampler, "steps": steps, "per_case": per_case,
                                         "seconds_this_run": round(time.perf_counter() - start, 1)}
        truth_halves = {k: {"spread_ratio": voxelwise_spread(v[: len(v) // 2], head_of(real[k]))
                            / voxelwise_spread(v[len(v) // 2:], head_of(real[k])),
                            "two_draw_ratio": two_draw_ratio(v[0], v[1], real[k], head_of(real[k])),
                            "correlation_with_real": float(np.mean([correlation_with_real(d, real[k], head_of(real[k]))
                                                                    for d in v]))}
                        for k, v in truth.items() if len(v) >= 4}
        results["truth"] = {"per_case": truth_halves}
        report = evaluate(args.real, list(folders.values()), out / "report", names=list(folders), features="random",
                          segmentation_steps=0, truth=args.truth, progress=False)
        for name in folders:
            results["runs"][name]["fid_3d"] = report["sets"][name]["fid_3d"]
            results["runs"][name]["kid_3d"] = report["sets"][name]["kid_3d"]
        results["truth"]["fid_3d"] = report["references"]["same-mask truth draws"]["fid_3d"]
        results["truth"]["kid_3d"] = report["references"]["same-mask truth draws"]["kid_3d"]
    except DiffusionGliomaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    largest = max(args.steps)
    for entry in [*results["runs"].values(), results["truth"]]:
        entry["mean"] = {m: float(np.mean([v[m] for v in entry["per_case"].values()])) for m in METRICS}
    for entry in results["runs"].values():
        anchor = results["runs"][f"{entry['sampler']} {largest}"]["per_case"]
        entry["vs_largest"] = {}
        for m in METRICS:
            diff = np.array([entry["per_case"][c][m] - anchor[c][m] for c in sorted(anchor)])
            low, high = bootstrap_interval(torch.from_numpy(diff), 2000, args.seed)
            entry["vs_largest"][m] = {"mean": float(diff.mean()), "ci95": [low, high], "within_noise": low <= 0 <= high}
    for sampler in args.samplers:
        fine = [s for s in sorted(args.steps)
                if all(results["runs"][f"{sampler} {s}"]["vs_largest"][m]["within_noise"] for m in DECIDING)]
        results.setdefault("smallest_within_noise", {})[sampler] = fine[0] if fine else largest
    write_json(out / "sampler_study.json", results)

    kid = lambda value: f"{value['mean']:.4f}" if isinstance(value, dict) else "n/a"  # noqa: E731
    lines = [f"Held-out phantoms: {len(truth)} ({args.real}), {args.draws} draws per mask; model {args.model}. Per case: "
             "spread of the draws over the truth's same-mask spread, two-draw ratio, mean correlation of a draw with "
             f"the real case; difference to the same sampler at {largest} steps with a bootstrap 95% interval over "
             "cases. FID/KID 3D: seeded random 3D features at 32^3 against the real cases.", "",
             "| set | spread / truth | two-draw ratio | correlation | FID 3D | KID 3D | spread vs largest [95% CI] | "
             "correlation vs largest [95% CI] | within noise |", "|---|---|---|---|---|---|---|---|---|"]
    for name, entry in results["runs"].items():
        v = entry["vs_largest"]
        ci = lambda m: f"{v[m]['mean']:+.3f} [{v[m]['ci95'][0]:+.3f}, {v[m]['ci95'][1]:+.3f}]"  # noqa: E731
        mean = entry["mean"]
        lines.append(f"| {name} steps | {mean['spread_ratio']:.3f} | {mean['two_draw_ratio']:.3f} | "
                     f"{mean['correlation_with_real']:.3f} | {entry['fid_3d']:.4g} | {kid(entry['kid_3d'])} | "
                     f"{ci('spread_ratio')} | {ci('correlation_with_real')} | "
                     f"{'yes' if all(v[m]['within_noise'] for m in DECIDING) else 'no'} |")
    t = results["truth"]
    lines.append(f"| reference: truth draws (one half over the other) | {t['mean']['spread_ratio']:.3f} | "
                 f"{t['mean']['two_draw_ratio']:.3f} | {t['mean']['correlation_with_real']:.3f} | "
                 f"{t['fid_3d']:.4g} | {kid(t['kid_3d'])} | | | |")
    lines += ["", "Smallest step count within noise of the largest (spread and correlation): "
              + ", ".join(f"{s} {n}" for s, n in results["smallest_within_noise"].items())]
    write_text(out / "sampler_study.md", "\n".join(lines) + "\n")
    print("\n".join(lines))

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, m in zip(axes, METRICS):
        for sampler in args.samplers:
            steps = sorted(args.steps)
            means = [results["runs"][f"{sampler} {s}"]["mean"][m] for s in steps]
            ax.plot(steps, means, marker="o", label=sampler)
        ax.axhline(t["mean"][m], ls="--", lw=1, color="grey")
        ax.text(sorted(args.steps)[0], t["mean"][m], "truth draws", fontsize=7, va="bottom", color="grey")
        ax.set_xlabel("sampling steps")
        ax.set_title(m.replace("_", " "), fontsize=9)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, out / "sampler_study.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
