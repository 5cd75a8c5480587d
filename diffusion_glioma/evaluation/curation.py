"""Curation: keep the synthetic volumes whose conditioning mask a segmenter trained on real data
recovers, as GliomaGen kept its "high-quality" subset (598 of 2,124) for nnU-Net.

    diffusion-glioma curate --real REAL --synthetic SYN --out CURATED --min-dice 0.7

Segmenters (the in-package MONAI UNet of the segmentation study) are cross-fitted: the real cases
are split into `folds` groups and one segmenter is trained without each group. Every synthetic volume
is scored, one at a time, by the segmenter that never saw the real case its mask descends from (a
segmenter that trained on the mask could answer from memory, and a volume of that mask would pass
whatever it looks like); a volume is kept when its whole-tumour Dice against the mask it was
conditioned on reaches `min_dice`. Two references give the threshold its meaning, each from the
segmenter that never saw the case: the held-out real cases (what a perfect generator scores) and
their mean-fill volumes (the right outline, no tumour appearance: what a curated set must reject). The output folder holds a `manifest.jsonl` of
the kept records and their files (hard links where the file system allows, else copies), so `evaluate`,
the segmentation study and provenance read it like any generated set; `curation.json` holds every
volume's score (and the fold that scored it), the folds and the references; `curation.png` their
distributions with the threshold.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..data.layouts import MODALITIES
from ..errors import DataError
from ..figures import pyplot, save_png
from ..io import atomic_path, write_json
from .segmentation import REGIONS, dice_and_hd95, mean_filled, predict, prepare_items, regions_of, train_segmenter
from .sets import read_set


def curate(real: str | Path, synthetic: str | Path, out: str | Path, *, min_dice: float = 0.7, steps: int = 300,
           folds: int = 3, seed: int = 0, progress: bool = True) -> dict:
    real, synthetic, out = Path(real), Path(synthetic), Path(out)
    manifest = synthetic / "manifest.jsonl"
    if not manifest.is_file():
        raise DataError(f"{synthetic}: no manifest.jsonl; curation takes a folder written by `generate`")
    if not 0 <= min_dice <= 1:
        raise DataError(f"--min-dice {min_dice}: must lie between 0 and 1")
    if folds < 2:
        raise DataError(f"--folds {folds}: cross-fitting needs at least 2 folds")
    if out.resolve() == synthetic.resolve():
        raise DataError(f"{out}: write the curated manifest to another folder than the synthetic set's")
    real_items = [i for i in read_set(real, MODALITIES) if i.mask is not None and i.labels is not None]
    real_cases = prepare_items(real_items)
    sources = sorted({c["source"] for c in real_cases})
    if len(sources) < 2:
        raise DataError(f"{real}: {len(sources)} real case(s) with a segmentation; cross-fitted curation needs "
                        "at least 2 (each segmenter is trained without the cases it scores)")
    fold_sources = fold_split(sources, min(folds, len(sources)), seed)
    fold_of = {source: k for k, group in enumerate(fold_sources) for source in group}
    segmenters, references = [], {"real held-out": {}, "mean-fill": {}}  # case -> WT Dice
    for k, group in enumerate(tqdm(fold_sources, desc="curate: segmenters", unit="fold", disable=not progress)):
        segmenters.append(train_segmenter([c for c in real_cases if c["source"] not in group], steps, seed + k))
        for case in (c for c in real_cases if c["source"] in group):
            references["real held-out"][case["id"]] = _region_dice(segmenters[k], case)["WT"]
            references["mean-fill"][case["id"]] = _region_dice(segmenters[k], mean_filled(case))["WT"]
    del real_cases

    records = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    items = read_set(synthetic, MODALITIES)
    scores = []
    for record, item in zip(tqdm(records, desc="curate", unit="volume", disable=not progress), items):
        case = prepare_items([item])[0]  # one at a time: memory does not grow with the set
        # A mask that descends from no real case was seen by no segmenter: any fold may score it.
        k = fold_of.get(case["source"], 0)
        scores.append({"output": record["output"], "source": case["source"], "fold": k,
                       **_region_dice(segmenters[k], case)})
    kept = [(record, s) for record, s in zip(records, scores) if s["WT"] >= min_dice]

    out.mkdir(parents=True, exist_ok=True)
    for record, _ in kept:  # the kept files move in with the manifest: no path of a manifest leaves its folder
        for relative in record["files"].values():
            _link_or_copy(synthetic / relative, out / relative)
    with atomic_path(out / "manifest.jsonl") as tmp:
        tmp.write_text("".join(json.dumps({**record, "curated_from": str(synthetic.resolve())}) + "\n"
                               for record, _ in kept))
    summary = {"synthetic": str(synthetic), "real": str(real), "min_dice": min_dice, "measure": "WT Dice",
               "segmenter": f"MONAI UNet (16-32-64), {steps} steps, 32^3 grid of 6 mm, cross-fitted over "
                            f"{len(fold_sources)} folds of {len(sources)} real cases",
               "folds": [{"held_out": group, "trained_on": len(sources) - len(group)} for group in fold_sources],
               "references": {name: {"WT_mean": float(np.mean(list(dice.values()))), "WT": dice,
                                     "kept": sum(v >= min_dice for v in dice.values()), "total": len(dice)}
                              for name, dice in references.items()},
               "kept": len(kept), "total": len(records), "scores": scores}
    write_json(out / "curation.json", summary)
    _histogram(out / "curation.png", [s["WT"] for s in scores], references, min_dice)
    return summary


def fold_split(sources: list[str], folds: int, seed: int) -> list[list[str]]:
    """The real cases in `folds` groups of near-equal size, shuffled by `seed`."""
    order = [sources[i] for i in np.random.default_rng(seed).permutation(len(sources))]
    return [sorted(order[k::folds]) for k in range(folds)]


def _region_dice(segmenter, case: dict) -> dict[str, float]:
    """Dice per region (WT/TC/ET) of one case against its own mask."""
    result = dice_and_hd95(predict(segmenter, [case]), regions_of(case["labels"][None]), (6.0,) * 3, bootstrap=1)
    return {r: result[r]["dice"] for r in REGIONS}


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the file system allows one (no extra space), else a copy; never half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)


def _histogram(path: Path, values: list[float], references: dict[str, dict[str, float]], threshold: float) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    bins = np.linspace(0, 1, 21)
    ax.hist(values, bins=bins, color="tab:orange", label=f"synthetic ({len(values)})")
    for (name, reference), color in zip(references.items(), ("tab:blue", "tab:gray")):
        ax.hist(list(reference.values()), bins=bins, histtype="step", linewidth=1.5, color=color,
                label=f"{name} ({len(reference)})")
    ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:g}")
    kept = sum(v >= threshold for v in values)
    ax.set_title(f"WT Dice of a segmenter that never saw the mask: {kept} of {len(values)} kept", fontsize=8)
    ax.set_xlabel("Dice")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)
