"""`evaluate`: score synthetic sets against a real one and write a report with figures.

    diffusion-glioma evaluate --real REAL --synthetic SYN_A SYN_B --names diffusion cgan --out REPORT

A synthetic folder written by `generate` is read through its manifest (any format); any other
folder through the dataset layouts. Every volume is normalised the same way (percentiles inside the
head -> [0, 1], background 0), so real and synthetic are compared on equal terms.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.layouts import MODALITIES, discover_cases
from ..data.preprocess import find_head
from ..errors import DataError
from ..figures import FigureRow, pyplot, save_png, to_ras, write_slices_figure
from ..io import atomic_path, load_volume, write_json
from .segmentation import REGIONS
from .fidelity import (SLICE_SIZE, VOLUME_SIZE, InceptionFeatures, RandomFeatures, frechet_distance, load_features_3d,
                       kernel_inception_distance, memorisation, ms_ssim_diversity, paired_similarity,
                       shipped_inception_path, trivial_references)


@dataclass
class Item:
    item_id: str
    key: str  # the real case it pairs with (its source mask's case), if any
    images: dict[str, Path]
    mask: Path | None
    labels: str | dict | None = None  # the mask's label scheme, when known
    disease: str | None = None
    source: str | None = None  # the real case it descends from (through augmentation); itself for real cases


def read_set(folder: str | Path, modalities: tuple[str, ...]) -> list[Item]:
    folder = Path(folder)
    manifest = folder / "manifest.jsonl"
    if manifest.is_file():
        items = []
        for line in manifest.read_text().splitlines():
            record = json.loads(line)
            files = record["files"]
            missing = [m for m in modalities if m not in files]
            if missing:
                raise DataError(f"{manifest}: output {record['output']} has no {missing} (the sets' modalities differ)")
            items.append(Item(record["output"], record["case_id"], {m: folder / files[m] for m in modalities},
                              Path(record["source_mask"]), record.get("label_scheme"), record.get("disease"),
                              record.get("derived_from") or record["case_id"]))
        return items
    items = []
    for case in discover_cases(folder):
        missing = case.missing(modalities)
        if missing:
            raise DataError(f"{folder}: case {case.case_id} has no {missing} (the sets' modalities differ)")
        items.append(Item(case.case_id, case.case_id, {m: case.images[m] for m in modalities}, case.seg, case.labels,
                          case.disease, case.case_id))
    if not items:
        raise DataError(f"{folder}: no volumes to evaluate")
    return items


def generator_training_cases(folder: str | Path) -> set[str]:
    """The real cases the generator of a synthetic set trained on (from its manifest's model folder)."""
    from ..provenance import trained_cases

    manifest = Path(folder) / "manifest.jsonl"
    if not manifest.is_file():
        return set()
    models = {json.loads(line).get("model") for line in manifest.read_text().splitlines() if line.strip()}
    return set().union(*(trained_cases(m) for m in models if m))


def normalised(item: Item, modalities) -> tuple[np.ndarray, np.ndarray]:
    """(modality, x, y, z) in [0, 1] on the item's own grid, and its affine."""
    volumes = [load_volume(item.images[m]) for m in modalities]
    for v in volumes[1:]:
        if v.shape != volumes[0].shape:
            raise DataError(f"{v.path}: shape {v.shape} differs from {volumes[0].path.name}")
    arrays = [v.array for v in volumes]
    head = find_head(arrays, 0.1)
    out = []
    for a in arrays:
        low, high = np.percentile(a[head], (0.5, 99.5))
        scaled = np.clip((a - low) / max(high - low, 1e-6), 0, 1)
        scaled[~head] = 0
        out.append(scaled.astype(np.float32))
    return np.stack(out), volumes[0].affine


def _to_ras_stack(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return np.stack([to_ras(c, affine) for c in volume])


AXES = ("sagittal", "coronal", "axial")  # RAS voxel axes 0, 1, 2


def _slices(volume_ras: np.ndarray, max_per_axis: int, tumour_ras: np.ndarray | None) -> dict[str, torch.Tensor]:
    """Slices along each axis, resized, as `{"axial/all": (n, modality, h, w), "axial/tumour": …}`:
    evenly spread over the head, and (when the mask is known) over the tumour."""
    out = {}
    head = volume_ras.max(axis=0) > 0
    for axis, axis_name in enumerate(AXES):
        others = tuple(a for a in range(3) if a != axis)
        for subset, region in (("all", head), ("tumour", tumour_ras)):
            if region is None:
                continue
            filled = np.flatnonzero(region.any(axis=others))
            if not len(filled):
                continue
            picks = np.linspace(filled[0], filled[-1], min(max_per_axis, len(filled))).round().astype(int)
            slices = [torch.from_numpy(np.take(volume_ras, i, axis=axis + 1).copy()) for i in picks]
            out[f"{axis_name}/{subset}"] = F.interpolate(torch.stack(slices), size=SLICE_SIZE, mode="bilinear",
                                                         align_corners=False)
    return out


def _tumour_ras(item: Item, affine: np.ndarray) -> np.ndarray | None:
    from ..labels import TUMOUR_LABELS, get_scheme

    if item.mask is None or item.labels is None:
        return None
    common = get_scheme(item.labels).to_common(load_volume(item.mask, kind="label").array, item.mask)
    return to_ras(np.isin(common, TUMOUR_LABELS), affine)


def evaluate(real: str | Path, synthetic: list[str | Path], out: str | Path, *, names: list[str] | None = None,
             modalities: tuple[str, ...] = MODALITIES, features: str = "auto", inception_weights=None,
             max_slices: int = 8, segmentation_steps: int = 200, features_3d: str | Path | None = None, seed: int = 0,
             progress: bool = True) -> dict:
    out = Path(out)
    names = names or [Path(s).name for s in synthetic]
    if len(names) != len(synthetic):
        raise DataError(f"{len(names)} names for {len(synthetic)} synthetic folders")
    sets = {"real": read_set(real, modalities), **{n: read_set(s, modalities) for n, s in zip(names, synthetic)}}
    if features not in ("auto", "inception", "random"):
        raise DataError(f"unknown features {features!r}; choose auto, inception or random")
    if features == "auto":  # Inception when its weights are installed, else the labelled random network
        features = "inception" if inception_weights or shipped_inception_path() else "random"
    extractor_2d = InceptionFeatures(inception_weights) if features == "inception" else None
    random_2d = {m: RandomFeatures(2, 1, seed) for m in modalities}
    if features_3d is not None:  # one network for all modalities together; per modality stays random
        random_3d_all = load_features_3d(features_3d, len(modalities))
    else:
        random_3d_all = RandomFeatures(3, len(modalities), seed)
    random_3d = {m: RandomFeatures(3, 1, seed) for m in modalities}

    # 1. One pass over every volume: features, the small volume, and what the paired metrics need.
    data: dict[str, dict] = {}
    for set_name, items in sets.items():
        per = {"ids": [], "keys": [], "f3d": {m: [] for m in modalities}, "f3d_all": [],
               "f2d": {m: {} for m in modalities},
               "small": [], "full": {}, "hist": {m: [] for m in modalities}}
        for item in tqdm(items, desc=f"evaluate {set_name}", unit="volume", disable=not progress):
            volume, affine = normalised(item, modalities)
            ras = _to_ras_stack(volume, affine)
            small = F.interpolate(torch.from_numpy(ras)[None], size=VOLUME_SIZE, mode="trilinear", align_corners=False)[0]
            slices = _slices(ras, max_slices, _tumour_ras(item, affine))
            per["ids"].append(item.item_id)
            per["keys"].append(item.key)
            per["small"].append(small)
            per["f3d_all"].append(random_3d_all(small[None])[0])
            for c, m in enumerate(modalities):
                per["f3d"][m].append(random_3d[m](small[None, c:c + 1])[0])
                for key, stack in slices.items():
                    one = stack[:, c:c + 1]
                    per["f2d"][m].setdefault(key, []).append(extractor_2d(one) if extractor_2d else random_2d[m](one))
                values = volume[c][volume[c] > 0]
                per["hist"][m].append(np.histogram(values, bins=50, range=(0, 1))[0])
            if set_name == "real" or len(per["full"]) < 64:
                per["full"][item.item_id] = (volume, affine, item)
        data[set_name] = per

    # 2. Metrics per synthetic set, per modality and overall.
    real = data["real"]
    results: dict = {"feature_extractor": {"2d": f"FID InceptionV3, 2048 features ({extractor_2d.path.name})"
                                           if extractor_2d else
                                           f"seeded random 2D CNN (seed {seed})",
                                           "3d": (f"3D CNN from {features_3d}" if features_3d else
                                                  f"seeded random 3D CNN (seed {seed})") + f" at {list(VOLUME_SIZE)}"},
                     "counts": {n: len(d["ids"]) for n, d in data.items()}, "sets": {}}
    notes = []
    results["real_diversity_ms_ssim"] = ms_ssim_diversity(torch.stack(real["small"]))
    results["paired_references"] = _paired_references(real["full"], modalities, seed)
    for name in names:
        syn = data[name]
        entry: dict = {"per_modality": {}}
        for m in modalities:
            pooled = lambda d: torch.cat([f for k, fs in d.items() if k.endswith("/all") for f in fs])  # noqa: E731
            r2d, s2d = pooled(real["f2d"][m]), pooled(syn["f2d"][m])
            r3d, s3d = torch.stack(real["f3d"][m]), torch.stack(syn["f3d"][m])
            by_slices = {}
            for key in sorted(set(real["f2d"][m]) & set(syn["f2d"][m])):
                rk, sk = torch.cat(real["f2d"][m][key]), torch.cat(syn["f2d"][m][key])
                by_slices[key] = {"fid": frechet_distance(rk, sk), "kid": kernel_inception_distance(rk, sk),
                                  "slices": [len(rk), len(sk)]}
            entry["per_modality"][m] = {
                "fid_2d": frechet_distance(r2d, s2d), "kid_2d": kernel_inception_distance(r2d, s2d),
                "fid_3d": frechet_distance(r3d, s3d), "kid_3d": kernel_inception_distance(r3d, s3d),
                "by_slices": by_slices,
            }
        r_all, s_all = torch.stack(real["f3d_all"]), torch.stack(syn["f3d_all"])
        entry["fid_3d"] = frechet_distance(r_all, s_all)
        entry["kid_3d"] = kernel_inception_distance(r_all, s_all)
        entry["diversity_ms_ssim"] = ms_ssim_diversity(torch.stack(syn["small"]))
        entry["paired"] = _paired(real["full"], syn, modalities)
        mem = memorisation(real["ids"], r_all, syn["ids"], s_all)
        entry["memorisation"] = {"real_typical_nn_distance": mem.real_typical_distance, "suspicious": mem.suspicious,
                                 "nearest": [{"synthetic": s, "real": r, "distance": d} for s, r, d in mem.nearest]}
        results["sets"][name] = entry
    if segmentation_steps > 0:
        from .segmentation import prepare_items, segmentation_study

        with_masks = lambda items: [i for i in items if i.mask is not None and i.labels is not None]  # noqa: E731
        real_cases = prepare_items(with_masks(sets["real"]))
        for name, folder in zip(names, synthetic):
            results["sets"][name]["segmentation"] = segmentation_study(
                real_cases, prepare_items(with_masks(sets[name])), segmentation_steps, seed,
                generator_cases=generator_training_cases(folder))
        results["segmentation_setup"] = (f"MONAI UNet (16-32-64), {segmentation_steps} steps, Dice + BCE on WT/TC/ET, "
                                         "32^3 grid of 6 mm; a third of the real cases held out for testing, drawn "
                                         "from outside the generator's training record; nothing derived from a "
                                         "held-out case is trained on")
    slices = min(sum(len(f) for k, fs in d["f2d"][modalities[0]].items() if k.endswith("/all") for f in fs)
                 for d in data.values())
    if extractor_2d is not None and slices < 2048:
        notes.append(f"2D FID from {slices} slices per set in 2048 Inception dimensions: the covariance is "
                     "rank-deficient and FID is biased upwards at this count; compare sets within this report, "
                     "not with published FIDs (KID is unbiased).")
    if extractor_2d is None:
        notes.append("2D features are a seeded random CNN (Inception weights not installed): compare sets within "
                     "this report only.")
    if min(results["counts"].values()) < 2:
        notes.append("Fewer than 2 volumes in a set: FID, KID and diversity are not defined and are shown as n/a.")
    results["notes"] = notes

    # 3. Report and figures.
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", _finite(results))
    _histograms(out / "histograms.png", data, names, modalities)
    _metric_bars(out / "metrics.png", results, names)
    _samples(out / "samples.png", data, names, modalities)
    if segmentation_steps > 0:
        _segmentation_bars(out / "segmentation.png", results, names)
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(_markdown(results, names, modalities))
    return results


def _head(volume: np.ndarray) -> np.ndarray:
    """The head of a normalised (modality, x, y, z) volume: where any modality is above 0."""
    return (volume > 0).any(axis=0)


def _mean_scores(scores: dict) -> dict:
    return {m: {k: (float(np.mean(v)) if v else None) for k, v in s.items()} for m, s in scores.items()}


def _paired(real_full: dict, syn: dict, modalities) -> dict:
    """SSIM/PSNR/MAE inside the head of each synthetic volume against the real volume of its mask."""
    scores = {m: {"ssim": [], "psnr": [], "mae": []} for m in modalities}
    pairs = 0
    for item_id, (volume, affine, item) in syn["full"].items():
        if item.key not in real_full:
            continue
        real_volume, real_affine, real_item = real_full[item.key]
        if real_volume.shape != volume.shape or not np.allclose(real_affine, affine, atol=1e-3):
            raise DataError(f"{item.images[modalities[0]]}: grid differs from its real volume "
                            f"{real_item.images[modalities[0]]}; paired metrics need the same grid")
        pairs += 1
        head = _head(real_volume)
        for c, m in enumerate(modalities):
            for k, v in paired_similarity(real_volume[c], volume[c], head).items():
                scores[m][k].append(v)
    return {"pairs": pairs, **_mean_scores(scores)}


def _paired_references(real_full: dict, modalities, seed: int) -> dict:
    """The paired metrics of reference sets against each real volume: mean-fill and noise inside
    the head (what a trivial generator scores) and another real case on the same grid (what
    realistic but unpaired data scores). A generator is judged against these, not alone."""
    names = ["mean-fill inside the head", "noise inside the head", "real vs another real case"]
    scores = {name: {m: {"ssim": [], "psnr": [], "mae": []} for m in modalities} for name in names}
    cases = list(real_full.items())
    for i, (case_id, (volume, affine, _)) in enumerate(cases):
        head = _head(volume)
        others = [v for j, (_, (v, a, _)) in enumerate(cases)
                  if j != i and v.shape == volume.shape and np.allclose(a, affine, atol=1e-3)]
        for c, m in enumerate(modalities):
            references = trivial_references(volume[c], head, seed + i)
            if others:
                references["real vs another real case"] = others[0][c]
            for name, reference in references.items():
                for k, v in paired_similarity(volume[c], reference, head).items():
                    scores[name][m][k].append(v)
    return {name: _mean_scores(s) for name, s in scores.items()}


def _finite(obj):
    """JSON has no infinity or NaN: write them as strings a reader cannot mistake."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj > 0 else ("-inf" if obj < 0 else "nan")
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _fmt(value, digits=3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _markdown(results: dict, names: list[str], modalities) -> str:
    lines = ["# Evaluation report", "",
             f"Volumes: {', '.join(f'{k} {v}' for k, v in results['counts'].items())}.",
             f"Features: 2D {results['feature_extractor']['2d']}; 3D {results['feature_extractor']['3d']}.",
             "FID and KID compare each synthetic set with the real set (lower is closer); diversity is the mean "
             "MS-SSIM between volumes of one set (lower is more diverse; the real set's is given for reference); "
             "paired SSIM (Gaussian window, sigma 1.5), PSNR and MAE compare a synthetic volume with the real volume "
             "of the same mask, inside the head only; the reference rows give what a trivial generator "
             "(mean-fill, noise) and real but unpaired data (another real case) score.", "",
             "## Overall", "", "| set | FID 3D | KID 3D | diversity (MS-SSIM) | pairs | memorisation suspects |",
             "|---|---|---|---|---|---|"]
    lines.append(f"| real | - | - | {_fmt(results['real_diversity_ms_ssim'])} | - | - |")
    for n in names:
        s = results["sets"][n]
        lines.append(f"| {n} | {_fmt(s['fid_3d'])} | {_fmt(s['kid_3d'])} | {_fmt(s['diversity_ms_ssim'])} | "
                     f"{s['paired']['pairs']} | {len(s['memorisation']['suspicious'])} |")
    lines += ["", "## Per modality", "",
              "| set | modality | FID 2D | KID 2D | FID 3D | KID 3D | SSIM (head) | PSNR dB (head) | MAE (head) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        s = results["sets"][n]
        for m in modalities:
            pm, pair = s["per_modality"][m], s["paired"][m]
            lines.append(f"| {n} | {m} | {_fmt(pm['fid_2d'])} | {_fmt(pm['kid_2d'])} | {_fmt(pm['fid_3d'])} | "
                         f"{_fmt(pm['kid_3d'])} | {_fmt(pair['ssim'])} | {_fmt(pair['psnr'])} | {_fmt(pair['mae'])} |")
    for reference, per_modality in results.get("paired_references", {}).items():
        for m in modalities:
            pair = per_modality[m]
            lines.append(f"| reference: {reference} | {m} | - | - | - | - | {_fmt(pair['ssim'])} | "
                         f"{_fmt(pair['psnr'])} | {_fmt(pair['mae'])} |")
    if "segmentation_setup" in results:
        lines += ["", "## Segmentation", "", f"Segmenter: {results['segmentation_setup']}. Dice [bootstrap 95% interval] (HD95 mm) "
                  "by the BraTS convention (both empty: Dice 1; one empty: Dice 0, HD95 373.13 mm) on the "
                  "held-out real cases per training regime; mask consistency: the real-trained segmenter on the "
                  "synthetic volumes against their conditioning masks.", "",
                  "| set | trained on / measure | WT | TC | ET |", "|---|---|---|---|---|"]
        for n in names:
            seg = results["sets"][n]["segmentation"]
            if "note" in seg:
                lines.append(f"| {n} | {seg['note']} | | | |")
                continue
            rows = [*seg["utility"].items(), ("mask consistency", seg.get("mask_consistency"))]
            for regime, scores in rows:
                cells = [f"{_fmt(scores[r]['dice'])} [{_fmt(scores[r]['dice_ci95'][0], 2)}, "
                         f"{_fmt(scores[r]['dice_ci95'][1], 2)}] ({_fmt(scores[r]['hd95'])})" if scores else "n/a"
                         for r in REGIONS]
                lines.append(f"| {n} | {regime} | " + " | ".join(cells) + " |")
        lines += ["", "Disease classifier (MONAI Classifier) tested on the held-out real cases:", "",
                  "| set | trained on | accuracy | balanced accuracy |", "|---|---|---|---|"]
        for n in names:
            cls = results["sets"][n]["segmentation"].get("classification", {})
            if "note" in cls:
                lines.append(f"| {n} | {cls['note']} | | |")
                continue
            for trained_on in ("real", "synthetic"):
                scores = cls.get(trained_on)
                lines.append(f"| {n} | {trained_on} | {_fmt(scores['accuracy']) if scores else 'n/a'} | "
                             f"{_fmt(scores['balanced_accuracy']) if scores else 'n/a'} |")
    lines += ["", "Figures: `samples.png` (real and synthetic volumes of the same masks), `histograms.png` "
              "(intensities inside the head), `metrics.png` (FID, KID and diversity per set).", ""]
    lines += [f"Note: {note}" for note in results["notes"]]
    return "\n".join(lines) + "\n"


def _segmentation_bars(path: Path, results: dict, names: list[str]) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        seg = results["sets"][name]["segmentation"]
        if "note" in seg:
            ax.set_title(f"{name}: {seg['note']}", fontsize=8)
            continue
        rows = [*seg["utility"].items(), ("mask consistency", seg.get("mask_consistency"))]
        width = 0.8 / len(rows)
        for i, (regime, scores) in enumerate(rows):
            values = [(scores[r]["dice"] or 0) if scores else 0 for r in REGIONS]
            ax.bar(np.arange(len(REGIONS)) + i * width, values, width, label=regime)
        ax.set_xticks(np.arange(len(REGIONS)) + 0.4 - width / 2, REGIONS)
        ax.set_ylim(0, 1)
        ax.set_title(f"{name}: Dice on held-out real cases", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)


def _histograms(path: Path, data: dict, names: list[str], modalities) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, len(modalities), figsize=(3.5 * len(modalities), 3), squeeze=False)
    centres = (np.arange(50) + 0.5) / 50
    for ax, m in zip(axes[0], modalities):
        for name in ["real", *names]:
            counts = np.sum(data[name]["hist"][m], axis=0).astype(float)
            ax.plot(centres, counts / max(counts.sum(), 1), label=name)
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("normalised intensity in the head", fontsize=8)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


def _metric_bars(path: Path, results: dict, names: list[str]) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(11, 3))
    for ax, (key, title) in zip(axes, [("fid_3d", "FID 3D (lower is closer)"), ("kid_3d", "KID 3D"),
                                       ("diversity_ms_ssim", "MS-SSIM within set (lower = more diverse)")]):
        values = [results["sets"][n][key] for n in names]
        ax.bar(names, [v if v is not None else 0 for v in values], color="tab:orange")
        if key == "diversity_ms_ssim" and results["real_diversity_ms_ssim"] is not None:
            ax.axhline(results["real_diversity_ms_ssim"], color="tab:blue", label="real")
            ax.legend(fontsize=8)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_png(fig, path)


def _samples(path: Path, data: dict, names: list[str], modalities, rows: int = 3) -> None:
    """Real and synthetic volumes of the same masks, every modality."""
    from ..labels import get_scheme

    figure_rows = []
    real_full = data["real"]["full"]
    for name in names:
        for item_id, (volume, affine, item) in list(data[name]["full"].items()):
            if len(figure_rows) >= 2 * rows * len(names) or item.key not in real_full:
                continue
            real_volume, real_affine, real_item = real_full[item.key]
            labels = np.zeros(volume.shape[1:], dtype=np.uint8)
            if real_item.mask is not None and real_item.labels is not None:
                labels = get_scheme(real_item.labels).to_common(load_volume(real_item.mask, kind="label").array)
            figure_rows.append(FigureRow(f"real {item.key}", {m: to_ras(real_volume[c], real_affine)
                                                              for c, m in enumerate(modalities)},
                                         to_ras(labels, real_affine), (0.0, 1.0)))
            figure_rows.append(FigureRow(f"{name} {item_id}", {m: to_ras(volume[c], affine)
                                                               for c, m in enumerate(modalities)},
                                         to_ras(labels, affine), (0.0, 1.0)))
            if sum(1 for r in figure_rows if r.name.startswith(name)) >= rows:
                break
    if figure_rows:
        write_slices_figure(path, figure_rows, list(modalities), title="real vs synthetic, same mask")
