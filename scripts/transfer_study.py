"""The transfer study: for a list of target-case counts, train on the target disease from scratch and
by fine-tuning from a model pretrained on the source disease; score both on held-out target cases and
plot the scores against the count.

    python scripts/transfer_study.py --config configs/demo.yaml --out runs/transfer --counts 1 2 3 \
        --source-steps 1500 --target-steps 300

The config gives the data cache (prepared, holding both diseases), the model and the optimiser; the
runs go to OUT/source, OUT/scratch_N and OUT/finetuned_N (re-running resumes), the numbers to
OUT/transfer.json and the plot to OUT/transfer.png.
"""

import argparse
import json
import sys

from diffusion_glioma.errors import DiffusionGliomaError
from diffusion_glioma.evaluation.transfer import run_transfer_study
from diffusion_glioma.training.config import load_train_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="training config (data.cache, model, optim)")
    parser.add_argument("--out", required=True, help="study folder")
    parser.add_argument("--counts", type=int, nargs="+", default=[2, 5, 10, 20], help="target training cases")
    parser.add_argument("--source", default="glioblastoma", help="source disease (pretraining)")
    parser.add_argument("--target", default="pediatric_diffuse_glioma", help="target disease")
    parser.add_argument("--source-steps", type=int, default=2000)
    parser.add_argument("--target-steps", type=int, default=500)
    parser.add_argument("--test-cases", type=int, default=2, help="target cases held out for scoring")
    parser.add_argument("--sample-steps", type=int, default=25, help="DPM-Solver++ steps when scoring")
    args = parser.parse_args(argv)
    try:
        results = run_transfer_study(
            load_train_config(args.config), args.out, counts=args.counts, source=args.source, target=args.target,
            source_steps=args.source_steps, target_steps=args.target_steps, test_cases=args.test_cases,
            sample_steps=args.sample_steps)
    except DiffusionGliomaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for mode in ("scratch", "finetuned"):
        print(mode, json.dumps({c: round(r["ssim"], 4) for c, r in results[mode].items()}))
    print(f"plot: {args.out}/transfer.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
