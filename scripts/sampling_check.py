"""Does a model sample, or regress to the mean? Held-out phantom masks, K draws each, on the model grid,
beside the phantom's own same-mask truth draws.

    diffusion-glioma phantom --out runs/phantom_heldout --n-adult 4 --n-pediatric 4 --first-index 100 \
        --spacing 3 --truth-draws 4 --truth-out runs/phantom_heldout_truth
    python scripts/sampling_check.py --model weights/phantom-demo --real runs/phantom_heldout \
        --truth runs/phantom_heldout_truth --out runs/sampling_check

Writes `sampling_check.json`, `sampling_check.md` (mean ± sd over cases) and `sampling_check.png`
(per case: the real case, two draws of its mask, and a truth draw). Columns (evaluation/conditional.py):
the two-draw ratio (about 1 for a true sampler, 0 for a regressor), the spread of K draws over the
truth's same-mask spread (1 right, 0 collapse), the same on 2x2x2 block means (where voxel-scale grain
averages out and anatomy does not), a draw's roughness over a truth draw's (above 1 grainier, below 1
smoother), and a draw's correlation with the real case; the truth draws' own scores are the reference row.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from diffusion_glioma.data.layouts import MODALITIES, Case, discover_cases
from diffusion_glioma.data.preprocess import prepare_case
from diffusion_glioma.evaluation.conditional import (coarse_spread_ratio, correlation_with_real, roughness_ratio,
                                                     spread_ratio, two_draw_ratio)
from diffusion_glioma.evaluation.fidelity import mean_and_sd
from diffusion_glioma.evaluation.sets import read_set
from diffusion_glioma.figures import pyplot, save_png
from diffusion_glioma.io import write_json, write_text
from diffusion_glioma.pipeline import load_pipeline


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--real", required=True, help="held-out phantom cohort")
    parser.add_argument("--truth", required=True, help="its same-mask truth draws (phantom --truth-draws)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--draws", type=int, default=4)
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--sampler", default="dpm++")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    pipe = load_pipeline(args.model).to("cpu")
    pipe.use_sampler(args.sampler)
    preprocess = pipe.grid
    truth_by_case: dict[str, list] = {}
    for item in read_set(args.truth, MODALITIES):
        truth_by_case.setdefault(item.key, []).append(item)
    rows, figure = [], []
    cases = [c for c in discover_cases(args.real) if c.case_id in truth_by_case][: args.cases]
    if not cases:
        sys.exit(f"{args.truth}: no truth draws of the cases in {args.real}")
    for case in tqdm(cases, desc="sampling check", unit="case"):
        real = prepare_case(case, preprocess)
        truths = [prepare_case(Case(t.item_id, t.images, case.seg, case.labels, case.disease, case.layout), preprocess)
                  for t in truth_by_case[case.case_id]]
        head = real.labels > 0
        labels = torch.from_numpy(real.labels.astype(np.int64))[None].repeat(args.draws, 1, 1, 1)
        generators = [torch.Generator().manual_seed(args.seed * 1000 + k) for k in range(args.draws)]
        draws = pipe(labels, case.disease, num_inference_steps=args.steps, generator=generators,
                     progress=False).volumes.numpy()
        truth = np.stack([t.image for t in truths])
        rows.append({
            "case": case.case_id,
            "model": {"two_draw_ratio": two_draw_ratio(draws[0], draws[1], real.image, head),
                      "spread_ratio": spread_ratio(draws, truth, head),
                      "coarse_spread_ratio": coarse_spread_ratio(draws, truth, head),
                      "roughness_ratio": roughness_ratio(draws[0], truth[0], head),
                      "correlation_with_real": correlation_with_real(draws[0], real.image, head)},
            # one half of the truth draws against the other: what a perfect sampler reads
            "truth": {"two_draw_ratio": two_draw_ratio(truth[0], truth[1], real.image, head),
                      "spread_ratio": spread_ratio(truth[:2], truth[2:], head) if len(truth) >= 4 else None,
                      "coarse_spread_ratio": coarse_spread_ratio(truth[:2], truth[2:], head) if len(truth) >= 4 else None,
                      "roughness_ratio": roughness_ratio(truth[1], truth[0], head),
                      "correlation_with_real": correlation_with_real(truth[0], real.image, head)},
            "mean_of_truth": {"two_draw_ratio": 0.0,
                              "roughness_ratio": roughness_ratio(truth[1:].mean(0), truth[0], head),
                              "correlation_with_real": correlation_with_real(truth.mean(0), real.image, head)},
        })
        figure.append((case.case_id, real, draws[:2], truth[0]))
    summary = {}
    for source in ("model", "truth", "mean_of_truth"):
        keys = [k for k, v in rows[0][source].items() if v is not None]
        summary[source] = {k: mean_and_sd([r[source][k] for r in rows]) for k in keys}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "sampling_check.json", {"model": str(Path(args.model).resolve()), "sampler": args.sampler,
                                             "steps": args.steps, "draws": args.draws, "summary": summary, "cases": rows})
    lines = [f"# Sampling check: {args.model}, {args.sampler} {args.steps} steps, {args.draws} draws per mask, "
             f"{len(rows)} held-out cases (mean ± sd over cases)", "",
             "| set | two-draw ratio | spread / truth spread | spread at 2x2x2 blocks / truth's | roughness / truth's "
             "| correlation with the real case |", "|---|---|---|---|---|---|"]
    names = {"model": "the model", "truth": "same-mask truth draws (a perfect sampler)",
             "mean_of_truth": "mean of the truth draws (a perfect regressor)"}
    for source, name in names.items():
        cells = [summary[source].get(k) for k in ("two_draw_ratio", "spread_ratio", "coarse_spread_ratio",
                                                  "roughness_ratio", "correlation_with_real")]
        text = ["-" if c is None else f"{c['mean']:.3f} ± {c['sd'] or 0:.3f}" for c in cells]
        lines.append(f"| {name} | " + " | ".join(text) + " |")
    write_text(out / "sampling_check.md", "\n".join(lines) + "\n")
    _figure(out / "sampling_check.png", figure, pipe.modalities)
    print("\n".join(lines))
    return 0


def _figure(path: Path, rows, modalities) -> None:
    plt = pyplot()
    channel = list(modalities).index("t2w") if "t2w" in modalities else 0
    fig, axes = plt.subplots(len(rows), 4, figsize=(8, 2.1 * len(rows)), squeeze=False)
    for r, (case_id, real, draws, truth) in enumerate(rows):
        tumour = np.argwhere(real.labels > 1)
        z = int(tumour[:, 2].mean()) if len(tumour) else real.labels.shape[2] // 2
        panels = [("real", real.image), ("draw 1", draws[0]), ("draw 2", draws[1]), ("truth draw", truth)]
        for c, (title, volume) in enumerate(panels):
            axes[r, c].imshow(np.rot90(volume[channel][:, :, z]), cmap="gray", vmin=-1, vmax=1)
            axes[r, c].set_axis_off()
            axes[r, c].set_title(f"{case_id[-9:]} {title}" if c == 0 else title, fontsize=7)
    fig.suptitle(f"{modalities[channel]}, axial slice through the tumour: two draws of one mask beside the truth",
                 fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
