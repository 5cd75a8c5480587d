"""Curation: keep the synthetic volumes whose conditioning mask a segmenter trained on real data
recovers, as GliomaGen kept its "high-quality" subset (598 of 2,124) for nnU-Net.

    diffusion-glioma curate --real REAL --synthetic SYN --out CURATED --min-dice 0.7

A segmenter (the in-package MONAI UNet of the segmentation study) is trained on the real cases and
segments every synthetic volume, one at a time; a volume is kept when its whole-tumour Dice against
the mask it was conditioned on reaches `min_dice`. The output folder holds a `manifest.jsonl` of
the kept records and their files (hard links where the file system allows, else copies), so `evaluate`,
the segmentation study and provenance read it like any generated set; `curation.json` holds every
volume's score and `curation.png` their distribution with the threshold.
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
from .segmentation import REGIONS, dice_and_hd95, predict, prepare_items, regions_of, train_segmenter
from .sets import read_set


def curate(real: str | Path, synthetic: str | Path, out: str | Path, *, min_dice: float = 0.7, steps: int = 300,
           seed: int = 0, progress: bool = True) -> dict:
    real, synthetic, out = Path(real), Path(synthetic), Path(out)
    manifest = synthetic / "manifest.jsonl"
    if not manifest.is_file():
        raise DataError(f"{synthetic}: no manifest.jsonl; curation takes a folder written by `generate`")
    if not 0 <= min_dice <= 1:
        raise DataError(f"--min-dice {min_dice}: must lie between 0 and 1")
    if out.resolve() == synthetic.resolve():
        raise DataError(f"{out}: write the curated manifest to another folder than the synthetic set's")
    real_items = [i for i in read_set(real, MODALITIES) if i.mask is not None and i.labels is not None]
    if not real_items:
        raise DataError(f"{real}: no real cases with a segmentation to train the curating segmenter on")
    segmenter = train_segmenter(prepare_items(real_items), steps, seed)

    records = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    items = read_set(synthetic, MODALITIES)
    scores = []
    for record, item in zip(tqdm(records, desc="curate", unit="volume", disable=not progress), items):
        case = prepare_items([item])[0]  # one at a time: memory does not grow with the set
        result = dice_and_hd95(predict(segmenter, [case]), regions_of(case["labels"][None]), (6.0,) * 3, bootstrap=1)
        scores.append({"output": record["output"], **{r: result[r]["dice"] for r in REGIONS}})
    kept = [(record, s) for record, s in zip(records, scores) if s["WT"] >= min_dice]

    out.mkdir(parents=True, exist_ok=True)
    for record, _ in kept:  # the kept files move in with the manifest: no path of a manifest leaves its folder
        for relative in record["files"].values():
            _link_or_copy(synthetic / relative, out / relative)
    with atomic_path(out / "manifest.jsonl") as tmp:
        tmp.write_text("".join(json.dumps({**record, "curated_from": str(synthetic.resolve())}) + "\n"
                               for record, _ in kept))
    summary = {"synthetic": str(synthetic), "real": str(real), "min_dice": min_dice, "measure": "WT Dice",
               "segmenter": f"MONAI UNet (16-32-64), {steps} steps on {len(real_items)} real cases, 32^3 grid of 6 mm",
               "kept": len(kept), "total": len(records), "scores": scores}
    write_json(out / "curation.json", summary)
    _histogram(out / "curation.png", [s["WT"] for s in scores], min_dice)
    return summary


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the file system allows one (no extra space), else a copy; never half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)


def _histogram(path: Path, values: list[float], threshold: float) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(values, bins=np.linspace(0, 1, 21), color="tab:orange")
    ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:g}")
    kept = sum(v >= threshold for v in values)
    ax.set_title(f"WT Dice of the real-trained segmenter vs the conditioning mask: {kept} of {len(values)} kept",
                 fontsize=8)
    ax.set_xlabel("Dice")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
