"""The utility study with nnU-Net, the field's segmenter, on the user's GPUs.

    diffusion-glioma nnunet-study export --real REAL --synthetic SYN --out STUDY
    (run the nnU-Net commands it prints: plan, train, predict)
    diffusion-glioma nnunet-study score --out STUDY

`export` writes one nnU-Net raw dataset per data mix GliomaGen used (real, synthetic, real +
synthetic, half the real + synthetic) and one of that half alone (what the half mix is compared
with), around one shared test set of held-out real cases, drawn leak-free as in the in-package
study (only cases outside the generator's training record; nothing derived from a test case in any
mix), or a test folder of the user's own (`test`: as many cases as
the question needs). `score` reads nnU-Net's predictions of the test set back and scores them by the
BraTS convention (WT/TC/ET Dice and HD95 with bootstrap intervals). With several folds each fold's
model predicts on its own (the folds are the study's seeds): a case's Dice is its mean over folds,
and the spread over folds is reported beside it, as the in-package study's over seeds.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import nnunet
from ..data.layouts import MODALITIES
from ..errors import DataError
from ..figures import pyplot, save_png
from ..io import atomic_path, load_volume, save_volume, write_json, write_text
from ..labels import TUMOUR_LABELS, get_scheme
from .segmentation import (REGIONS, across_seeds, all_paired_differences, bootstrap_interval, dice_and_hd95,
                           difference_text, fixed_split, held_out_split, labelled_comparisons, regions_of,
                           training_mixes)
from .sets import generator_training_cases, read_set

STUDY_FILE = "study.json"
NNUNET_FOLDS = ("0", "1", "2", "3", "4")  # nnU-Net v2's default five-fold cross-validation
DEFAULT_TRAINER = "nnUNetTrainer"  # 1000 epochs of 250 iterations


def _link_or_copy(source: Path, target: Path, copy: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    if copy:
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
    else:
        os.symlink(source.resolve(), target)


def _common_labels(item) -> tuple[np.ndarray, np.ndarray]:
    volume = load_volume(item.mask, kind="label")
    return get_scheme(item.labels).to_common(volume.array, item.mask), volume.affine


def export_study(real: str | Path, synthetic: str | Path, out: str | Path, *, dataset_id: int = 600,
                 seed: int = 0, copy: bool = False, folds: str = "all", test: str | Path | None = None,
                 trainer: str = DEFAULT_TRAINER, progress: bool = True) -> dict:
    """`trainer`: the nnU-Net trainer class every mix trains with (nnU-Net's own shorter schedules,
    nnUNetTrainer_100epochs say, fit a GPU budget; the default trains 1000 epochs)."""
    out = Path(out)
    if (out / STUDY_FILE).is_file():
        raise DataError(f"{out}: already holds an exported study ({STUDY_FILE}); score it, or export to another folder")
    if not re.fullmatch(r"nnUNetTrainer\w*", trainer):
        raise DataError(f"--trainer '{trainer}': not an nnU-Net trainer class name (nnUNetTrainer, nnUNetTrainer_100epochs, ...)")
    fold_list = folds.split()
    if fold_list != ["all"] and (not fold_list or len(set(fold_list)) < len(fold_list)
                                 or not set(fold_list) <= set(NNUNET_FOLDS)):
        raise DataError(f"--folds '{folds}': name 'all' or distinct folds among {' '.join(NNUNET_FOLDS)} "
                        "(nnU-Net's five-fold cross-validation)")
    folds = " ".join(fold_list)
    with_mask = lambda items: [i for i in items if i.mask is not None and i.labels is not None]  # noqa: E731
    real_items, synthetic_items = with_mask(read_set(real, MODALITIES)), with_mask(read_set(synthetic, MODALITIES))
    if not real_items or not synthetic_items:
        raise DataError(f"{real if not real_items else synthetic}: no volumes with segmentations to export")

    def light(items):  # what the split and the mixes need, without reading an image
        return [{"id": i.item_id, "source": i.source or i.key, "disease": i.disease or "unknown", "item": i}
                for i in items]

    if test is None:
        split = held_out_split(light(real_items), light(synthetic_items), seed, generator_training_cases(synthetic))
    else:
        test_items = with_mask(read_set(test, MODALITIES))
        if not test_items:
            raise DataError(f"{test}: no real cases with segmentations to test on")
        split = fixed_split(light(real_items), light(synthetic_items), light(test_items),
                            generator_training_cases(synthetic))
    if isinstance(split, str):
        raise DataError(f"{real if test is None else test}: {split}")
    test_cases, train_real, train_synthetic = split
    mixes = training_mixes(train_real, train_synthetic, seed)
    smallest = min(mixes, key=lambda mix: len(mixes[mix]))
    source = synthetic if smallest == "synthetic" else real
    if not mixes[smallest]:
        raise DataError(f"{source}: the '{smallest}' mix has no training cases left once the test cases are held out")
    if fold_list != ["all"] and len(mixes[smallest]) < len(NNUNET_FOLDS):
        # nnU-Net splits each dataset into 5 folds and fails on fewer cases, after hours of preprocessing.
        raise DataError(f"{source}: the '{smallest}' mix has {len(mixes[smallest])} training cases, fewer than "
                        f"nnU-Net's {len(NNUNET_FOLDS)} folds need; export with --folds all, or with more cases")

    # One label mapping for every dataset and the test set (nnU-Net values are consecutive).
    present: set[int] = set()
    for entry in test_cases + train_real + train_synthetic:
        present |= set(np.unique(_common_labels(entry["item"])[0]).tolist())
    values = nnunet.label_values([c for c in TUMOUR_LABELS if c in present])
    raw = out / "nnUNet_raw"

    def write_case(entry: dict, images_dir: Path, labels_dir: Path, name: str) -> None:
        item = entry["item"]
        for c, m in enumerate(MODALITIES):
            _link_or_copy(Path(item.images[m]), images_dir / f"{name}_{c:04d}.nii.gz", copy)
        common, affine = _common_labels(item)
        save_volume(labels_dir / f"{name}.nii.gz", nnunet.to_nnunet(common, values), affine, dtype=np.int16)

    datasets = {}
    total = len(test_cases) + sum(len(cases) for cases in mixes.values())
    bar = tqdm(total=total, desc="nnunet-study export", unit="case", disable=not progress)
    for k, (mix, cases) in enumerate(mixes.items()):
        folder = raw / f"Dataset{dataset_id + k:03d}_{mix.replace('+', '_plus_').replace(' ', '_')}"
        for entry in cases:
            write_case(entry, folder / "imagesTr", folder / "labelsTr", entry["id"])
            bar.update()
        nnunet.write_dataset_json(folder, MODALITIES, values, len(cases), folder.name.split("_", 1)[1],
                                  f"diffusion_glioma nnU-Net study, mix '{mix}'")
        datasets[mix] = {"id": dataset_id + k, "folder": folder.name, "cases": [e["id"] for e in cases]}
    for entry in test_cases:
        write_case(entry, out / "test" / "imagesTs", out / "test" / "labelsTs", entry["id"])
        bar.update()
    bar.close()

    study = {"real": str(real), "synthetic": str(synthetic),
             "test": None if test is None else str(test), "seed": seed, "label_values": values,
             "predictions": "per fold",
             "test_cases": [e["id"] for e in test_cases], "datasets": datasets, "folds": folds,
             "trainer": trainer, "commands": commands(out, datasets, folds, trainer)}
    (out / "commands.sh").write_text("#!/usr/bin/env bash\nset -euo pipefail\n" + "\n".join(study["commands"]) + "\n")
    write_json(out / STUDY_FILE, study)  # last: its presence marks a finished export
    return study


def prediction_folders(out: Path, dataset: dict, folds: str, per_fold: bool = True) -> dict[str, Path]:
    """Where each fold's predictions of the test set lie: one folder for a single fold (or "all"), one
    per fold (fold_K) when there are several, each model predicting alone. A study exported before
    per-fold predictions (`per_fold` False) predicted once with the folds' ensemble, into one folder."""
    fold_list = folds.split()
    folder = out / "predictions" / dataset["folder"]
    if len(fold_list) == 1 or not per_fold:
        return {fold_list[0] if len(fold_list) == 1 else f"{folds} (ensemble)": folder}
    return {f: folder / f"fold_{f}" for f in fold_list}


def commands(out: Path, datasets: dict, folds: str, trainer: str = DEFAULT_TRAINER) -> list[str]:
    """The nnU-Net v2 commands that plan, train and predict every mix (3d_fullres, with `trainer`)."""
    root = shlex.quote(str(out.resolve()))
    fold_list = folds.split()
    lines = [f"export nnUNet_raw={root}/nnUNet_raw nnUNet_preprocessed={root}/nnUNet_preprocessed "
             f"nnUNet_results={root}/nnUNet_results",
             "nnUNetv2_plan_and_preprocess -d " + " ".join(str(d["id"]) for d in datasets.values())
             + " --verify_dataset_integrity"]
    for d in datasets.values():
        lines += [f"nnUNetv2_train {d['id']} 3d_fullres {fold} -tr {trainer}" for fold in fold_list]
    for d in datasets.values():
        for fold, folder in prediction_folders(out.resolve(), d, folds).items():
            lines.append(f"nnUNetv2_predict -i {root}/test/imagesTs -o {shlex.quote(str(folder))} -d {d['id']} "
                         f"-c 3d_fullres -f {fold} -tr {trainer}")
    lines.append(f"diffusion-glioma nnunet-study score --out {root}")
    return lines


def score_study(out: str | Path, *, progress: bool = True) -> dict:
    """Dice and HD95 (BraTS convention, bootstrap 95% intervals) of every mix's predictions."""
    import json

    out = Path(out)
    if not (out / STUDY_FILE).is_file():
        raise DataError(f"{out}: no {STUDY_FILE}; run `diffusion-glioma nnunet-study export` first")
    study = json.loads((out / STUDY_FILE).read_text())
    values = {int(k): v for k, v in study["label_values"].items()}
    truth_dir = out / "test" / "labelsTs"
    truths, spacing = {}, None  # read once: every mix and fold is scored against the same labels
    for case in study["test_cases"]:
        truth = load_volume(truth_dir / f"{case}.nii.gz", kind="label")
        spacing = spacing or truth.spacing
        truths[case] = (truth.shape, regions_of(torch.from_numpy(nnunet.to_common(truth.array, values).astype(np.int64))))
    per_fold: dict[str, dict] = {}
    per_fold_predictions = study.get("predictions") == "per fold"  # absent from studies exported before
    for mix, dataset in sorted(study["datasets"].items(), key=lambda kv: kv[1]["id"]):  # in the order of the mixes' ids
        for fold, folder in prediction_folders(out, dataset, study["folds"], per_fold_predictions).items():
            missing = [c for c in study["test_cases"] if not (folder / f"{c}.nii.gz").is_file()]
            if missing:
                raise DataError(f"{folder}: no prediction for {len(missing)} test case(s) (e.g. {missing[0]}.nii.gz); "
                                "run the nnUNetv2_predict lines of commands.sh")
            predictions = []
            for case in tqdm(study["test_cases"], desc=f"score {mix} fold {fold}", unit="case", disable=not progress):
                prediction = load_volume(folder / f"{case}.nii.gz", kind="label")
                if prediction.shape != truths[case][0]:
                    raise DataError(f"{prediction.path}: shape {prediction.shape} differs from the test label {truths[case][0]}")
                predictions.append(regions_of(torch.from_numpy(nnunet.to_common(prediction.array, values).astype(np.int64))))
            # Volumes of different grids are scored one by one; the means and intervals pool the cases.
            per_fold.setdefault(fold, {})[mix] = _pooled_scores(predictions, [truths[c][1] for c in study["test_cases"]],
                                                                spacing)
    results = next(iter(per_fold.values())) if len(per_fold) == 1 else _mean_over_folds(list(per_fold.values()))
    # Each mix against the real mix, and the half mix against the half alone, on the same test cases: the
    # paired design's power (the in-package study's comparisons).
    summary = {"test_cases": len(study["test_cases"]), "folds": list(per_fold), "scores": results,
               "paired_to_real": {}, **all_paired_differences(results)}
    if len(per_fold) > 1:  # the spread over folds, as the in-package study's over seeds
        runs = [{"utility": scores, **all_paired_differences(scores)} for scores in per_fold.values()]
        summary["across_folds"] = across_seeds(runs, list(per_fold))
    write_json(out / "scores.json", summary)
    write_text(out / "scores.md", _markdown(study, summary))
    _bars(out / "scores.png", results)
    return summary


def _pooled_scores(predictions: list[torch.Tensor], truths: list[torch.Tensor], spacing) -> dict:
    same_grid = len({p.shape for p in predictions}) == 1
    if same_grid:
        return dice_and_hd95(torch.stack(predictions), torch.stack(truths), spacing)
    per_case = [dice_and_hd95(p[None], t[None], spacing, bootstrap=1) for p, t in zip(predictions, truths)]
    out = {}
    for region in REGIONS:
        dice = torch.tensor([c[region]["dice"] for c in per_case], dtype=torch.float64)
        hd95 = torch.tensor([c[region]["hd95"] for c in per_case], dtype=torch.float64)
        out[region] = {"dice": float(dice.mean()), "hd95": float(hd95.mean()), "n": len(per_case),
                       "dice_per_case": dice.tolist(), "hd95_per_case": hd95.tolist(),
                       "dice_ci95": bootstrap_interval(dice, 1000, 0), "hd95_ci95": bootstrap_interval(hd95, 1000, 0)}
    return out


def _mean_over_folds(folds: list[dict]) -> dict:
    """Each mix's scores with a case's Dice and HD95 the mean of its scores over the folds' models (the
    interval over cases then holds the folds' luck averaged out)."""
    out = {}
    for mix in folds[0]:
        out[mix] = {}
        for region in REGIONS:
            per_case = {key: torch.tensor([fold[mix][region][f"{key}_per_case"] for fold in folds],
                                          dtype=torch.float64).mean(0) for key in ("dice", "hd95")}
            out[mix][region] = {"n": len(per_case["dice"])}
            for key, values in per_case.items():
                out[mix][region].update({key: float(values.mean()), f"{key}_per_case": values.tolist(),
                                         f"{key}_ci95": bootstrap_interval(values, 1000, 0)})
    return out


def _markdown(study: dict, summary: dict) -> str:
    results, folds = summary["scores"], summary["folds"]
    models = (f"the mean over the {len(folds)} folds' models (folds {', '.join(folds)}) of each case's Dice"
              if len(folds) > 1 else f"fold {folds[0]}")
    lines = ["# nnU-Net study", "", f"{len(study['test_cases'])} real test cases, none trained on, shared by every mix; "
             f"nnU-Net v2 3d_fullres, {models}; Dice [bootstrap 95% interval over cases] (HD95 mm) by the BraTS "
             "convention.", "", "| trained on | cases | WT | TC | ET |", "|---|---|---|---|---|"]
    for mix, scores in results.items():
        cells = [f"{scores[r]['dice']:.3f} [{scores[r]['dice_ci95'][0]:.2f}, {scores[r]['dice_ci95'][1]:.2f}] "
                 f"({scores[r]['hd95']:.1f})" for r in REGIONS]
        lines.append(f"| {mix} | {len(study['datasets'][mix]['cases'])} | " + " | ".join(cells) + " |")
    paired = labelled_comparisons(summary)
    if paired:
        lines += ["", "Each mix against the real mix, and the half mix against the same half of the real cases alone, "
                  "on the same test cases: mean per-case Dice difference [bootstrap 95% interval over cases]; an "
                  "interval that holds 0 is a difference within noise.", "", "| mix | WT | TC | ET |", "|---|---|---|---|"]
        for pair, differences in paired:
            lines.append(f"| {pair} | " + " | ".join(difference_text(differences[r]) for r in REGIONS) + " |")
    spread = labelled_comparisons(summary.get("across_folds") or {})
    if spread:
        lines += ["", f"The same differences fold by fold: mean ± sd over the {len(folds)} folds (the training's luck).",
                  "", "| mix | WT | TC | ET |", "|---|---|---|---|"]
        for pair, regions in spread:
            lines.append(f"| {pair} | " + " | ".join(
                f"{regions[r]['mean']:+.3f} ± {regions[r]['sd']:.3f}" for r in REGIONS) + " |")
    return "\n".join(lines) + "\n"


def _bars(path: Path, results: dict) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    width = 0.8 / max(len(results), 1)
    for i, (mix, scores) in enumerate(results.items()):
        ax.bar(np.arange(len(REGIONS)) + i * width, [scores[r]["dice"] for r in REGIONS], width, label=mix,
               yerr=np.array([[scores[r]["dice"] - scores[r]["dice_ci95"][0], scores[r]["dice_ci95"][1] - scores[r]["dice"]]
                              for r in REGIONS]).T)
    ax.set_xticks(np.arange(len(REGIONS)) + 0.4 - width / 2, REGIONS)
    ax.set_ylim(0, 1)
    ax.set_title("nnU-Net Dice on the real test cases", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)
