"""The transfer study: for each count of target cases and each seed, three arms at equal compute
(from scratch, fine-tuned from a model pretrained on the source disease, and trained jointly on
both) and a scratch arm with the fine-tuned one's target steps; every model is scored on the same
held-out target cases (KID on tumour slices, the ranking; paired metrics inside the head) beside
mean-fill and an independent real target cohort of the same size.

    diffusion-glioma phantom --out runs/phantom_transfer_peds --n-adult 16 --n-pediatric 30 --spacing 3
    python scripts/transfer_study.py --config configs/transfer_phantom.yaml --out runs/transfer \
        --counts 1 4 10 --test-cases 10 --seeds 0 1 2 --source-steps 1000 --target-steps 300 --slices-per-case 2

The config gives the data (prepared into its cache first), the model and the optimiser; runs go to
OUT/seedS/{source,scratch_N,scratch_target_steps_N,finetuned_N,joint_N} (re-running resumes: a trained arm is
not trained again, a scored one not sampled again), the numbers to
OUT/transfer.json and OUT/transfer.md, the plot to OUT/transfer.png.
"""

import argparse
import sys
from pathlib import Path

from diffusion_glioma.errors import DiffusionGliomaError
from diffusion_glioma.evaluation.transfer import markdown_table, run_transfer_study
from diffusion_glioma.io import write_text
from diffusion_glioma.training.config import load_train_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="training config (data, model, optim)")
    parser.add_argument("--out", required=True, help="study folder")
    parser.add_argument("--counts", type=int, nargs="+", default=[2, 5, 10, 20], help="target training cases")
    parser.add_argument("--source", default="glioblastoma", help="source disease (pretraining)")
    parser.add_argument("--target", default="pediatric_diffuse_glioma", help="target disease")
    parser.add_argument("--source-steps", type=int, default=2000)
    parser.add_argument("--target-steps", type=int, default=500)
    parser.add_argument("--test-cases", type=int, default=10,
                        help="target cases held out for scoring, and as many more as the independent real reference "
                             "(default 10)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    parser.add_argument("--sample-steps", type=int, default=25, help="DPM-Solver++ steps when scoring")
    parser.add_argument("--features", choices=["auto", "inception", "random"], default="auto",
                        help="2D features for KID (auto: the FID Inception when installed)")
    parser.add_argument("--slices-per-case", type=int, default=4, help="axial tumour slices per held-out case for KID")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        results = run_transfer_study(
            load_train_config(args.config), args.out, counts=args.counts, source=args.source, target=args.target,
            source_steps=args.source_steps, target_steps=args.target_steps, test_cases=args.test_cases,
            seeds=args.seeds, sample_steps=args.sample_steps, features=args.features,
            slices_per_case=args.slices_per_case, progress=not args.quiet)
    except DiffusionGliomaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table = markdown_table(results)
    write_text(Path(args.out) / "transfer.md", table)
    print(table)
    print(f"plot: {args.out}/transfer.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
