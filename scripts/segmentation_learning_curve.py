"""How long the segmentation study's segmenter must train: its Dice on a fixed real test set after
each budget of one run per seed, and the smallest budget within 0.01 of the plateau (WT, the mean
over seeds). Pass that budget to `evaluate --segmentation-steps`; if the curve has not flattened
(its last two budgets more than 0.01 apart), train longer.

    diffusion-glioma phantom --out runs/phantom_segtest --n-adult 15 --n-pediatric 15 --first-index 200 --spacing 3
    python scripts/segmentation_learning_curve.py --real runs/phantom_train --test runs/phantom_segtest \
        --budgets 100 200 400 800 1600 --seeds 0 1 2 --out runs/segmentation_curve

`--schedule poly` trains with nnU-Net's decaying learning rate instead, one run per budget (the
curve then costs the sum of the budgets, not the largest).

Writes OUT/learning_curve.json, OUT/learning_curve.md and OUT/learning_curve.png.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from diffusion_glioma.data.layouts import MODALITIES
from diffusion_glioma.errors import DataError, DiffusionGliomaError
from diffusion_glioma.evaluation.segmentation import (REGIONS, SCHEDULES, learning_curve, plateau_budget,
                                                      prepare_segmented)
from diffusion_glioma.evaluation.sets import read_set
from diffusion_glioma.io import write_json, write_text


def cases_with_masks(folder: str) -> list[dict]:
    cases = prepare_segmented(read_set(folder, MODALITIES))
    if not cases:
        raise DataError(f"{folder}: no real cases with segmentations")
    return cases


def mean_curve(curves: list[list[dict]]) -> list[dict]:
    return [{"steps": points[0]["steps"], **{r: float(np.mean([p[r] for p in points])) for r in REGIONS},
             **{f"{r}_sd": float(np.std([p[r] for p in points], ddof=1)) if len(points) > 1 else None
                for r in REGIONS}}
            for points in zip(*curves)]


def markdown(result: dict) -> str:
    choice = result["plateau"]
    lines = [f"Segmenter learning curve ({result['schedule']} learning rate): {result['train_cases']} training cases, "
             f"{result['test_cases']} test cases, seeds {result['seeds']} (mean ± sd over seeds)", "",
             "| steps | " + " | ".join(f"{r} Dice" for r in REGIONS) + " |", "|---|" + "---|" * len(REGIONS)]
    for point in result["mean"]:
        cells = [f"{point[r]:.3f}" + (f" ± {point[f'{r}_sd']:.3f}" if point[f"{r}_sd"] is not None else "")
                 for r in REGIONS]
        lines.append(f"| {point['steps']} | " + " | ".join(cells) + " |")
    lines += ["", f"{choice['region']} plateau {choice['plateau']:.3f}; the smallest budget within "
              f"{choice['tolerance']} of it: **{choice['steps']} steps**; "
              + ("the curve has flattened (last two budgets within the tolerance)." if choice["flat"] else
                 "**the curve has not flattened yet: add a larger budget.**")]
    return "\n".join(lines) + "\n"


def plot(path: Path, result: dict) -> None:
    from diffusion_glioma.figures import pyplot, save_png

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    steps = [p["steps"] for p in result["mean"]]
    for region, marker in zip(REGIONS, "osd"):
        ax.errorbar(steps, [p[region] for p in result["mean"]], yerr=[p[f"{region}_sd"] or 0 for p in result["mean"]],
                    marker=marker, capsize=3, label=region)
    choice = result["plateau"]
    ax.axvline(choice["steps"], color="grey", linestyle=":", label=f"within {choice['tolerance']} of the WT plateau")
    ax.set_xscale("log")
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.minorticks_off()
    ax.set_xlabel("segmenter training steps")
    ax.set_ylabel("Dice on the real test set")
    ax.legend(fontsize=7)
    ax.set_title(f"{result['train_cases']} real training cases, {result['test_cases']} test cases, "
                 f"{len(result['seeds'])} seeds, {result['schedule']} learning rate", fontsize=9)
    fig.tight_layout()
    save_png(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", required=True, help="real training cases (BraTS layout or a generated set)")
    parser.add_argument("--test", required=True, help="real test cases, none of them in --real")
    parser.add_argument("--budgets", type=int, nargs="+", default=[100, 200, 400, 800, 1600],
                        help="training steps at which the run is read (each at least 1)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--schedule", choices=SCHEDULES, default="constant",
                        help="the segmenter's learning rate: constant (one run per seed, read at each budget) or "
                             "poly, nnU-Net's decay to 0 (one run per seed and budget)")
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if min(args.budgets) < 1:
        parser.error("--budgets: every budget is at least 1 step")
    try:
        train, test = cases_with_masks(args.real), cases_with_masks(args.test)
        # A generated --real set names its source cases: none of them may be a test case either.
        names = lambda cases: {c["id"] for c in cases} | {c["source"] for c in cases}  # noqa: E731
        shared = names(test) & names(train)
        if shared:
            raise DataError(f"{args.test}: {len(shared)} test cases are also in {args.real} (e.g. {sorted(shared)[0]})")
        curves = [learning_curve(train, test, args.budgets, seed, schedule=args.schedule)
                  for seed in tqdm(args.seeds, desc="seeds", unit="seed")]
    except DiffusionGliomaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    mean = mean_curve(curves)
    result = {"train_cases": len(train), "test_cases": len(test), "seeds": args.seeds, "schedule": args.schedule,
              "per_seed": curves,
              "mean": mean, "plateau": plateau_budget(mean, "WT", args.tolerance)}
    out = Path(args.out)
    write_json(out / "learning_curve.json", result)
    write_text(out / "learning_curve.md", markdown(result))
    plot(out / "learning_curve.png", result)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
