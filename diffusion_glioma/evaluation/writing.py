"""The evaluation report as a person reads it: `report.md`, `report.json` and PNG figures."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..figures import FigureRow, pyplot, save_png, to_ras, write_slices_figure
from ..io import load_volume, write_json, write_text
from .fidelity import MEAN_FILL
from .references import ANOTHER_REAL_CASE
from .segmentation import PAIRED_WITH, REGIONS, difference_text, labelled_comparisons, paired_key
from .sets import normalised


def write_report(out: Path, results: dict, data: dict, names: list[str], modalities, real_by_key: dict,
                 segmentation: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", finite(results))
    _histograms(out / "histograms.png", data, names, modalities)
    _metric_bars(out / "metrics.png", results, names)
    _samples(out / "samples.png", data, names, modalities, real_by_key)
    if segmentation:
        _segmentation_bars(out / "segmentation.png", results, names)
    write_text(out / "report.md", markdown(results, names, modalities))


def finite(obj):
    """JSON has no infinity or NaN: write them as strings a reader cannot mistake."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj > 0 else ("-inf" if obj < 0 else "nan")
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return obj


def _fmt(value, digits=3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, dict) and "sd" in value:  # a score over seeds
        return f"{value['mean']:.{digits}g} ± {value['sd']:.2g}"
    if isinstance(value, dict) and "mean" in value:  # KID over subsets (one subset: both whole sets, no spread)
        spread = f" ± {value['std']:.2g}" if value.get("subsets", 2) > 1 else ""
        interval = value.get("ci95")
        return f"{value['mean']:.{digits}g}{spread}" + (f" [{_fmt(interval[0], 2)}, {_fmt(interval[1], 2)}]"
                                                        if interval else "")
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _fid_text(block: dict) -> str:
    interval = block.get("fid_3d_ci95")
    return _fmt(block["fid_3d"]) + (f" [{_fmt(interval[0], 2)}, {_fmt(interval[1], 2)}]" if interval else "")


def _mean_over(per_modality: dict, key: str):
    values = [v[key] for v in per_modality.values() if v.get(key) is not None and math.isfinite(v[key])]
    return float(np.mean(values)) if values else None


COMPARISON_COLUMNS = {
    "fid_3d": "FID 3D", "kid_3d": "KID 3D",
    "spread": "spread of a mask's draws / truth's (1 right, 0 collapse)",
    "two_draw": "two-draw ratio (about 1 sampler, 0 regressor)", "correlation": "correlation with the real case",
    "ssim": "SSIM (head; paired: rewards the mean)", "psnr": "PSNR dB (head)", "mae": "MAE (head)",
    "diversity": "MS-SSIM across masks", "fixed_mask_diversity": "MS-SSIM at a fixed mask",
    "dice_trained_on": "WT Dice, segmenter trained on it -> real",
    "dice_consistency": "WT Dice, mask consistency (held-out masks)", "balanced_accuracy": "balanced accuracy, classifier trained on it -> real"}


def _row(name: str, block: dict, modalities) -> dict:
    """The distribution, conditional, paired and diversity columns of one set or reference."""
    mean = lambda key: _mean_over({m: block["paired"][m] for m in modalities}, key)  # noqa: E731
    conditional = block.get("conditional") or {}
    fixed = block["fixed_mask_diversity"]
    value = lambda key: (conditional.get(key) or {}).get("mean")  # noqa: E731
    return {"set": name, "fid_3d": block["fid_3d"], "kid_3d": block["kid_3d"], "spread": value("spread_ratio"),
            "two_draw": value("two_draw_ratio"), "correlation": value("correlation_with_real"),
            "ssim": mean("ssim"), "psnr": mean("psnr"), "mae": mean("mae"), "diversity": block["diversity_ms_ssim"],
            "fixed_mask_diversity": fixed["ms_ssim"] if fixed else None}


def comparison_rows(results: dict, names: list[str], modalities) -> list[dict]:
    """One row per synthetic set with the headline numbers, and the rows that give them meaning: the
    reference sets scored on the same cases and grid (references.py: the truth's same-mask draws and
    their mean, an independent real cohort, mean-fill, noise), real but unpaired data (paired scores),
    the real set's own diversity, and the segmenter and classifier trained on real cases (the same
    held-out splits for every set: the split depends on the seed and the generator's training record,
    which the compared generators share). Scores over several seeds are mean and sd."""
    mean = lambda block, key: _mean_over({m: block[m] for m in modalities}, key)  # noqa: E731
    rows = []
    for n in names:
        s = results["sets"][n]
        seg = s.get("segmentation") or {}
        consistency = seg.get("mask_consistency")
        rows.append({**_row(n, s, modalities), "dice_trained_on": _wt_dice(seg, "synthetic"),
                     "dice_consistency": consistency["WT"]["dice"] if consistency else None,
                     "balanced_accuracy": _balanced_accuracy(seg, "synthetic -> real")})
    for reference, block in results.get("references", {}).items():
        rows.append(_row(f"reference: {reference}", block, modalities))
    for reference, per_modality in results.get("paired_references", {}).items():
        if reference not in results.get("references", {}):  # paired only: no set of its own
            rows.append({"set": f"reference: {reference}", "ssim": mean(per_modality, "ssim"),
                         "psnr": mean(per_modality, "psnr"), "mae": mean(per_modality, "mae")})
    first = next((results["sets"][n].get("segmentation") or {} for n in names), {})
    rows.append({"set": "reference: real cases", "diversity": results["real_diversity_ms_ssim"],
                 "dice_trained_on": _wt_dice(first, "real"), "balanced_accuracy": _balanced_accuracy(first, "real -> real")})
    for baseline in ("head size", "tumour location"):
        if (first.get("classification") or {}).get("regimes", {}).get(f"{baseline} only -> real"):
            rows.append({"set": f"reference: {baseline} only",
                         "balanced_accuracy": _balanced_accuracy(first, f"{baseline} only -> real")})
    return rows


def _wt_dice(seg: dict, regime: str):
    """WT Dice of a segmenter trained on `regime`: mean and sd over seeds when the study ran several."""
    spread = ((seg.get("across_seeds") or {}).get("utility") or {}).get(regime)
    if spread:
        return {"mean": spread["WT"]["dice_mean"], "sd": spread["WT"]["dice_sd"]}
    scores = (seg.get("utility") or {}).get(regime)
    return scores["WT"]["dice"] if scores else None


def _balanced_accuracy(seg: dict, regime: str):
    spread = ((seg.get("across_seeds") or {}).get("classification") or {}).get(regime)
    if spread:
        return spread["balanced_accuracy"]
    scores = (seg.get("classification") or {}).get("regimes", {}).get(regime)
    return scores["balanced_accuracy"] if scores else None


def _memorisation_text(mem: dict) -> str:
    if not mem["nearest"]:  # the real set shares no case with the training record, which cannot be read
        return f"n/a ({mem.get('why_not') or 'no training case among the real cases'})"
    return f"{len(mem['suspicious'])} of {len(mem['nearest'])}"


def _comparison_markdown(rows: list[dict]) -> list[str]:
    lines = ["## Comparison", "", "Every set against the same real cases; the reference rows, scored the same way on "
             "the same cases and grid, give each column its meaning. Rank generators by distribution distance (FID, "
             "KID) and by the spread of a mask's draws against the truth's, never by the paired columns (SSIM, PSNR, "
             "MAE: means over modalities), which the conditional mean wins. Spread, two-draw ratio and correlation "
             "are computed on the volumes' own grid inside the head over the masks with several draws "
             "(evaluation/conditional.py); the segmentation and classification columns are scored on the study's "
             "held-out real cases, see below.", "",
             "| set | " + " | ".join(COMPARISON_COLUMNS.values()) + " |",
             "|---|" + "---|" * len(COMPARISON_COLUMNS)]
    for row in rows:
        lines.append(f"| {row['set']} | " + " | ".join(_fmt(row[k]) if row.get(k) is not None else "-"
                                                      for k in COMPARISON_COLUMNS) + " |")
    return lines + [""]


def markdown(results: dict, names: list[str], modalities) -> str:
    lines = ["# Evaluation report", "",
             f"Volumes: {', '.join(f'{k} {v}' for k, v in results['counts'].items())}.",
             f"Features: 2D {results['feature_extractor']['2d']}; 3D {results['feature_extractor']['3d']}.",
             "FID and KID compare each synthetic set with the real set (lower is closer; KID is the mean ± standard "
             "deviation over 100 subsets); diversity is the mean MS-SSIM between volumes of different masks in a set "
             "(lower is more diverse; the real set's beside it) and between samples of the same mask (1 = every "
             "sample of a mask is the same volume: mode collapse); paired SSIM (Gaussian window, sigma 1.5), PSNR and "
             "MAE compare a synthetic volume with the real volume of the same mask, inside the head only; the "
             "reference rows give what a trivial generator (mean-fill, noise) and real but unpaired data (another "
             "real case) score.", "",
             *_comparison_markdown(results["comparison"]),
             "## Overall", "",
             "| set | FID 3D | KID 3D | diversity across masks | diversity at a fixed mask | pairs | memorisation flags |",
             "|---|---|---|---|---|---|---|"]
    lines.append(f"| real | - | - | {_fmt(results['real_diversity_ms_ssim'])} | - | - | - |")
    for n in names:
        s = results["sets"][n]
        fixed = s["fixed_mask_diversity"]
        fixed_text = f"{_fmt(fixed['ms_ssim'])} ({fixed['masks']} masks)" if fixed else "n/a (one sample per mask)"
        mem = s["memorisation"]
        lines.append(f"| {n} | {_fid_text(s)} | {_fmt(s['kid_3d'])} | {_fmt(s['diversity_ms_ssim'])} | "
                     f"{fixed_text} | {s['paired']['pairs']} | {_memorisation_text(mem)} |")
    for reference, block in results.get("references", {}).items():
        lines.append(f"| reference: {reference} | {_fid_text(block)} | {_fmt(block['kid_3d'])} | "
                     f"{_fmt(block['diversity_ms_ssim'])} | - | {block['paired']['pairs']} | - |")
    lines += ["", "FID 3D: the value [bootstrap 95% interval over the volumes of both sets]; KID 3D: mean ± sd over "
              "subsets (half of the smaller set when it is small) [bootstrap 95% interval over the volumes of both "
              "sets]; KID is unbiased, so a set as close as the real cohort's own draw scores about 0 and may go "
              "below it.", ""]
    lines += ["", "Memorisation: a synthetic volume is flagged when it lies closer (3D features) to a training case "
              "other than the one its mask came from than the "
              f"{_fmt(100 * results['sets'][names[0]]['memorisation']['quantile'] if names else 5.0)}th percentile of "
              "the real cases' nearest-neighbour distances (that share of real cases falls below it too). When the "
              "real set is held out from the generator's training, its training cases are read from the folder its "
              "training record names, and a volume is flagged when it lies closer to one of them than that "
              "percentile of the held-out real cases' distances to their nearest training case.", ""]
    lines += ["## Per modality", "",
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
    lines += ["", "## By disease", "",
              "SSIM is the mean over modalities; the reference columns score the same disease's real cases.", "",
              "| set | disease | volumes real / synthetic | FID 3D | KID 3D | FID 2D (" + "/".join(modalities) + ") | "
              "SSIM (head) | reference SSIM: mean-fill / real vs real | diversity at a fixed mask |",
              "|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        for disease, b in results["sets"][n]["by_disease"].items():
            fid_2d = " / ".join(_fmt(b["per_modality"][m]["fid_2d"]) for m in modalities)
            refs = b["paired_references"]
            fixed = b["fixed_mask_diversity"]
            lines.append(f"| {n} | {disease} | {b['volumes'][0]} / {b['volumes'][1]} | {_fmt(b['fid_3d'])} | "
                         f"{_fmt(b['kid_3d'])} | {fid_2d} | {_fmt(_mean_over({m: b['paired'][m] for m in modalities}, 'ssim'))} | "
                         f"{_fmt(_mean_over(refs[MEAN_FILL], 'ssim'))} / "
                         f"{_fmt(_mean_over(refs[ANOTHER_REAL_CASE], 'ssim'))} | "
                         f"{_fmt(fixed['ms_ssim']) if fixed else 'n/a'} |")
    if "segmentation_setup" in results:
        lines += _segmentation_markdown(results, names)
    if "nnunet_study" in results:
        folds = results["nnunet_study"].get("folds") or []
        models = f", a case's Dice the mean over {len(folds)} folds' models" if len(folds) > 1 else ""
        lines += ["", "## nnU-Net study", "", f"nnU-Net v2 (3d_fullres) trained on each mix on the user's GPUs, "
                  f"tested on {results['nnunet_study']['test_cases']} shared real test cases{models}; Dice "
                  "[bootstrap 95% interval] (HD95 mm), BraTS convention.", "", "| trained on | WT | TC | ET |",
                  "|---|---|---|---|"]
        for mix, scores in results["nnunet_study"]["scores"].items():
            lines.append(f"| {mix} | " + " | ".join(
                f"{_fmt(scores[r]['dice'])} [{_fmt(scores[r]['dice_ci95'][0], 2)}, {_fmt(scores[r]['dice_ci95'][1], 2)}] "
                f"({_fmt(scores[r]['hd95'])})" for r in REGIONS) + " |")
        for pair, differences in labelled_comparisons(results["nnunet_study"]):
            lines.append(f"| {pair}, paired per case | " + " | ".join(difference_text(differences[r]) for r in REGIONS)
                         + " |")
    lines += ["", "Figures: `samples.png` (real and synthetic volumes of the same masks), `histograms.png` "
              "(intensities inside the head), `metrics.png` (FID, KID and diversity per set).", ""]
    lines += [f"Note: {note}" for note in results["notes"]]
    return "\n".join(lines) + "\n"


def _resolved(seg: dict) -> list[str]:
    return seg.get("regions_resolved", list(REGIONS))


def _unresolved(seg: dict) -> str:
    spacing = seg.get("spacing_mm")
    return f"not scored at {max(spacing):g} mm" if spacing else "not scored"


def _region_cells(seg: dict, text) -> str:
    """The WT | TC | ET cells of a row: `text(region)` where the study's grid resolves the region."""
    return " | ".join(text(r) if r in _resolved(seg) else _unresolved(seg) for r in REGIONS)


def _segmentation_markdown(results: dict, names: list[str]) -> list[str]:
    lines = ["", "## Segmentation", "", f"Segmenter: {results['segmentation_setup']}. Dice [bootstrap 95% interval] "
             "(HD95 mm) by the BraTS convention (both empty: Dice 1; one empty: Dice 0, HD95 373.13 mm) on the "
             "held-out real cases per training regime; mask consistency: the real-trained segmenter on the "
             "synthetic volumes of the held-out cases' masks (masks it never saw) against those masks, beside its "
             "score on mean-fill volumes of the same cases (right outline, no tumour appearance: near 0 if the "
             "column measures the tumour's appearance).", "",
             "| set | trained on / measure | WT | TC | ET |", "|---|---|---|---|---|"]
    for n in names:
        seg = results["sets"][n]["segmentation"]
        if "note" in seg:
            lines.append(f"| {n} | {seg['note']} | | | |")
            continue
        rows = [*seg["utility"].items(), *_consistency_rows(seg)]
        for regime, scores in rows:
            cells = (_region_cells(seg, lambda r: f"{_fmt(scores[r]['dice'])} [{_fmt(scores[r]['dice_ci95'][0], 2)}, "
                                                  f"{_fmt(scores[r]['dice_ci95'][1], 2)}] ({_fmt(scores[r]['hd95'])})")
                     if scores else " | ".join("n/a" for _ in REGIONS))
            lines.append(f"| {n} | {regime} | {cells} |")
        spread = seg.get("across_seeds")
        for regime, scores in (spread or {}).get("utility", {}).items():
            if scores:
                lines.append(f"| {n} | {regime}, mean ± sd over seeds {spread['seeds']} | " + _region_cells(
                    seg, lambda r: f"{scores[r]['dice_mean']:.3f} ± {scores[r]['dice_sd']:.3f}") + " |")
    paired = []
    for n in names:
        seg = results["sets"][n]["segmentation"]
        spread = seg.get("across_seeds") or {}
        for reference in PAIRED_WITH:
            key = paired_key(reference)
            for regime, differences in (seg.get(key) or {}).items():
                paired.append(f"| {n} | {regime} - {reference}, seed {seg.get('seed', 'n/a')} | "
                              + _region_cells(seg, lambda r: difference_text(differences[r])) + " |")
            for regime, differences in (spread.get(key) or {}).items():
                paired.append(f"| {n} | {regime} - {reference}, mean ± sd over seeds {spread['seeds']} | "
                              + _region_cells(seg, lambda r: f"{differences[r]['mean']:+.3f} ± {differences[r]['sd']:.3f}")
                              + " |")
            for regime, differences in (spread.get(f"{key}_pooled") or {}).items():
                paired.append(f"| {n} | {regime} - {reference}, each case's Dice averaged over seeds {spread['seeds']} | "
                              + _region_cells(seg, lambda r: difference_text(differences[r])) + " |")
    if paired:
        lines += ["", "Each regime against the real regime on the same test cases (can the volumes stand in for the "
                  "real cases? for the half alone: what losing half of them costs), and the half mix against the "
                  "same half of the real cases alone (do the volumes help where half the real cases are missing?): "
                  "mean per-case Dice difference [bootstrap 95% interval over cases]; an interval that holds 0 is a "
                  "difference within noise.", "",
                  "| set | trained on | WT | TC | ET |", "|---|---|---|---|---|", *paired]
    between = [(regime, pair, differences) for regime, pairs in (results.get("segmentation_between_sets") or {}).items()
               for pair, differences in pairs.items()]
    if between:
        seg = next(results["sets"][n]["segmentation"] for n in names if "utility" in results["sets"][n]["segmentation"])
        lines += ["", "The sets against each other (the ranking): the same regime trained on each set, mean over test "
                  "cases of the difference of a case's Dice (its mean over the training seeds) [bootstrap 95% "
                  "interval over cases]; an interval that holds 0 is within noise.", "",
                  "| trained on | sets | WT | TC | ET |", "|---|---|---|---|---|",
                  *(f"| {regime} | {pair} | " + _region_cells(seg, lambda r: difference_text(differences[r])) + " |"
                    for regime, pair, differences in between)]
    if not any("classification" in results["sets"][n]["segmentation"] for n in names):
        lines += ["", "Disease classifier: none trained (--classification-steps 0, or no study above ran)."]
        return lines + _anomaly_lines(results, names)
    lines += ["", "Disease classifier (MONAI Classifier):", "",
              "| set | trained on -> tested on | accuracy | balanced accuracy |", "|---|---|---|---|"]
    for n in names:
        cls = results["sets"][n]["segmentation"].get("classification", {})
        if "note" in cls:
            lines.append(f"| {n} | {cls['note']} | | |")
            continue
        for regime, scores in cls.get("regimes", {}).items():
            lines.append(f"| {n} | {regime} | {_fmt(scores['accuracy']) if scores else 'n/a'} | "
                         f"{_fmt(scores['balanced_accuracy']) if scores else 'n/a'} |")
    lines += ["", "Domain Inception score under the real-trained disease classifier (1 = no confident, distinct "
              "predictions; 2 = confidently one disease each, both diseases equally often), on the held-out real "
              "cases and on the synthetic volumes of their masks (the classifier never saw those masks). Better is "
              "closer to the held-out real score, not higher: above it, the synthetic set tells the diseases apart "
              "more confidently than real scans do.", "",
              "| set | held-out real | synthetic (n) | synthetic - real |", "|---|---|---|---|"]
    for n in names:
        score = results["sets"][n]["segmentation"].get("classification", {}).get("domain_inception_score")
        if score:
            both = score["synthetic"] is not None and score["real (held out)"] is not None
            gap = score["synthetic"] - score["real (held out)"] if both else None
            lines.append(f"| {n} | {_fmt(score['real (held out)'])} | {_fmt(score['synthetic'])} "
                         f"({score.get('n_synthetic', 'n/a')}) | {_fmt(gap)} |")
    return lines + _anomaly_lines(results, names)


def _anomaly_lines(results: dict, names: list[str]) -> list[str]:
    if not any(results["sets"][n]["segmentation"].get("anomaly") for n in names):
        return ["", "VAE anomaly-score classifier: none trained (--anomaly-steps 0, or no study above ran)."]
    lines = ["", "VAE anomaly-score classifier (a VAE trained on healthy tissue; tumour where its reconstruction error "
             "is large), tested on the held-out real cases: voxel AUROC (tumour vs healthy head voxels), slice AUROC "
             "(axial slices with vs without tumour), Dice at the training set's 99th-percentile healthy error, and "
             "the best Dice over thresholds (an upper bound):", "",
             "| set | trained on | voxel AUROC | slice AUROC | Dice | best Dice |", "|---|---|---|---|---|---|"]
    for n in names:
        for regime, scores in (results["sets"][n]["segmentation"].get("anomaly") or {}).items():
            cells = [_fmt(scores[k]) if scores else "n/a" for k in ("voxel_auroc", "slice_auroc", "dice", "best_dice")]
            lines.append(f"| {n} | {regime} | " + " | ".join(cells) + " |")
    return lines


def _consistency_rows(seg: dict) -> list[tuple[str, dict | None]]:
    return [("mask consistency (held-out masks)", seg.get("mask_consistency")),
            ("negative control: mean-fill of the held-out cases", seg.get("mask_consistency_control"))]


def _segmentation_bars(path: Path, results: dict, names: list[str]) -> None:
    """One panel per set: Dice per region and regime (the mean ± sd over the training seeds where several
    ran), with what the panels share in one title above them and one legend under them, where it covers
    no bar."""
    plt = pyplot()
    width_inches = max(5 * len(names), 8)  # one panel still holds the shared title and the legend
    fig, axes = plt.subplots(1, len(names), figsize=(width_inches, 3.6), squeeze=False)
    legend, shared = {}, "Dice on held-out real cases"
    for ax, name in zip(axes[0], names):
        seg = results["sets"][name]["segmentation"]
        if "note" in seg:
            ax.set_title(f"{name}: {seg['note']}", fontsize=8, wrap=True)
            continue
        rows, regions = [*seg["utility"].items(), *_consistency_rows(seg)], _resolved(seg)
        spread = seg.get("across_seeds") or {}
        width = 0.8 / len(rows)
        for i, (regime, scores) in enumerate(rows):
            over_seeds = (spread.get("utility") or {}).get(regime)
            if over_seeds:
                values, errors = [over_seeds[r]["dice_mean"] for r in regions], [over_seeds[r]["dice_sd"] for r in regions]
            else:
                values, errors = [(scores[r]["dice"] or 0) if scores else 0 for r in regions], None
            bars = ax.bar(np.arange(len(regions)) + i * width, values, width, yerr=errors, capsize=2, label=regime)
            legend.setdefault(regime, bars)
        ax.set_xticks(np.arange(len(regions)) + 0.4 - width / 2, regions)
        ax.set_ylim(0, 1)
        ax.set_title(name, fontsize=9)
        seeds = f"; training regimes: mean ± sd over {len(spread['seeds'])} seeds" if spread.get("seeds") else ""
        hidden = "".join(f"; {r} {_unresolved(seg)}" for r in REGIONS if r not in regions)
        shared = f"Dice on held-out real cases{seeds}{hidden}"  # the same for every set of one report
    fig.suptitle(shared, fontsize=9)
    columns = max(1, min(len(legend), int(width_inches // 2.7)))  # the longest entries are about 2.7 inches wide
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=columns, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.02 + 0.055 * math.ceil(len(legend) / columns), 1, 1))
    save_png(fig, path)


def _histograms(path: Path, data: dict, names: list[str], modalities) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(modalities), figsize=(3.5 * len(modalities), 3), squeeze=False)
    centres = (np.arange(50) + 0.5) / 50
    for ax, m in zip(axes[0], modalities):
        for name in ["real", *names]:
            counts = data[name].hist[m].astype(float)
            ax.plot(centres, counts / max(counts.sum(), 1), label=name)
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("normalised intensity in the head", fontsize=8)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


def _metric_bars(path: Path, results: dict, names: list[str]) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(14, 3))
    mean = lambda v: (v["mean"] if isinstance(v, dict) else v) if v is not None else None  # noqa: E731
    panels = [("fid_3d", "FID 3D (lower is closer)"), ("kid_3d", "KID 3D (mean ± sd over subsets)"),
              ("diversity_ms_ssim", "MS-SSIM across masks (lower = more diverse)"),
              ("fixed_mask_diversity", "MS-SSIM at a fixed mask (1 = collapse)")]
    for ax, (key, title) in zip(axes, panels):
        raw = [results["sets"][n][key] for n in names]
        values = [(v["ms_ssim"] if key == "fixed_mask_diversity" and v else mean(v)) for v in raw]
        errors = [v["std"] if key == "kid_3d" and v else 0 for v in raw]
        ax.bar(names, [v if v is not None else 0 for v in values], yerr=errors, color="tab:orange")
        if key in ("diversity_ms_ssim", "fixed_mask_diversity") and results["real_diversity_ms_ssim"] is not None:
            ax.axhline(results["real_diversity_ms_ssim"], color="tab:blue", label="real, across cases")
            ax.legend(fontsize=8)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_png(fig, path)


def _samples(path: Path, data: dict, names: list[str], modalities, real_by_key: dict) -> None:
    """Real and synthetic volumes of the same masks, every modality."""
    from ..labels import get_scheme

    figure_rows = []
    for name in names:
        for index, volume, affine in data[name].shown:
            item = data[name].items[index]
            real_item = real_by_key[item.key]
            real_volume, real_affine = normalised(real_item, modalities)
            labels = np.zeros(volume.shape[1:], dtype=np.uint8)
            if real_item.mask is not None and real_item.labels is not None:
                labels = get_scheme(real_item.labels).to_common(load_volume(real_item.mask, kind="label").array)
            figure_rows.append(FigureRow(f"real {item.key}", {m: to_ras(real_volume[c], real_affine)
                                                              for c, m in enumerate(modalities)},
                                         to_ras(labels, real_affine), (0.0, 1.0)))
            figure_rows.append(FigureRow(f"{name} {item.item_id}", {m: to_ras(volume[c], affine)
                                                                    for c, m in enumerate(modalities)},
                                         to_ras(labels, affine), (0.0, 1.0)))
    if figure_rows:
        write_slices_figure(path, figure_rows, list(modalities), title="real vs synthetic, same mask")
