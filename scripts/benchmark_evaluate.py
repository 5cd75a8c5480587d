"""Memory and time of `evaluate` as the sets grow: peak resident memory and seconds per volume for
N real and M synthetic volumes (BraTS scale is 500 real + 2,000 synthetic), on a small grid.

    python scripts/benchmark_evaluate.py --out runs/bench_evaluate --sizes 50:200 125:500 500:2000

A few phantom cases (and their same-mask truth draws, as the synthetic volumes) are written once;
each set is a manifest that names them again and again under new ids, so a set of 2,000 volumes
costs no disk, while `evaluate` reads, normalises, features and scores every one of its volumes as
it would distinct files (from the page cache: cold disk reads are not measured). Each size runs `evaluate` in a process of its own (a clean peak), with the
random features (`--features inception` for the 2D Inception network: about 1 s a slice on 2 CPU
cores) and no segmentation study. Prints one JSON line per size, appends them to OUT/benchmark.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from diffusion_glioma.data.layouts import MODALITIES
from diffusion_glioma.data.phantom import write_cohort
from diffusion_glioma.io import write_text


def write_manifest(folder: Path, records: list[dict]) -> None:
    write_text(folder / "manifest.jsonl", "".join(json.dumps(r) + "\n" for r in records))


def make_sets(out: Path, n_real: int, n_synthetic: int, spacing: float) -> tuple[Path, Path]:
    """A real set of `n_real` volumes and a synthetic set of `n_synthetic` (the same number of draws
    for each real volume), both naming the same 8 phantom cases and their 4 truth draws each."""
    source, truth = out / f"source_{spacing:g}mm", out / f"source_{spacing:g}mm_truth"
    if not (truth / "manifest.jsonl").is_file():
        write_cohort(source, n_adult=4, n_pediatric=4, spacing=spacing, truth_draws=4, truth_out=truth, progress=False)
    cases = [json.loads(line) for line in (truth / "manifest.jsonl").read_text().splitlines() if line.strip()]
    by_case: dict[str, list[dict]] = {}
    for record in cases:
        by_case.setdefault(record["case_id"], []).append(record)
    ids = sorted(by_case)
    real, synthetic = out / f"real_{n_real}_{spacing:g}mm", out / f"synthetic_{n_synthetic}_for_{n_real}_{spacing:g}mm"
    for folder, origin in ((real, source), (synthetic, truth)):
        if not folder.is_dir():  # a copy of the few files the manifest names, inside the set's folder
            shutil.copytree(origin, folder.with_suffix(".tmp"), dirs_exist_ok=True)
            folder.with_suffix(".tmp").rename(folder)
    real_records, synthetic_records = [], []
    draws = -(-n_synthetic // n_real)  # ceil: the last real volumes may get one draw fewer
    for i in range(n_real):
        first = by_case[ids[i % len(ids)]][0]
        cid, output = first["case_id"], f"real{i:05d}"
        real_records.append({"output": output, "case_id": output, "disease": first["disease"],
                             "label_scheme": first["label_scheme"], "source_mask": first["source_mask"],
                             "files": {m: f"{cid}/{cid}-{m}.nii.gz" for m in MODALITIES}})
        for k in range(draws):
            if len(synthetic_records) < n_synthetic:
                draw = by_case[cid][k % len(by_case[cid])]
                synthetic_records.append({**draw, "output": f"{output}_syn{k:03d}", "case_id": output,
                                          "derived_from": output})
    write_manifest(real, real_records)
    write_manifest(synthetic, synthetic_records)
    return real, synthetic


def run_one(real: str, synthetic: str, out: str, features: str) -> None:
    """Child process: one `evaluate`, then its wall time and peak memory as a JSON line."""
    from diffusion_glioma.evaluation.report import evaluate

    start = time.perf_counter()
    results = evaluate(real, [synthetic], out, names=["synthetic"], features=features, segmentation_steps=0,
                       progress=False)
    seconds = time.perf_counter() - start
    volumes = sum(results["counts"].values())  # real, synthetic and every reference set: volumes read and scored
    print(json.dumps({"seconds": round(seconds, 1), "volumes_scored": volumes,
                      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--sizes", nargs="+", default=["50:200", "125:500", "500:2000"],
                        help="REAL:SYNTHETIC volume counts, one evaluate each")
    parser.add_argument("--spacing", type=float, default=6.0, help="the phantom's grid (mm); 6 mm is about 32x40x32")
    parser.add_argument("--features", default="random", choices=["random", "inception"])
    parser.add_argument("--one", nargs=3, metavar=("REAL", "SYNTHETIC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return run_one(*args.one, args.features)
    args.out.mkdir(parents=True, exist_ok=True)
    for size in args.sizes:
        try:
            n_real, n_synthetic = (int(n) for n in size.split(":"))
        except ValueError:
            parser.error(f"--sizes: {size!r} is not REAL:SYNTHETIC")
        real, synthetic = make_sets(args.out, n_real, n_synthetic, args.spacing)
        child = subprocess.run([sys.executable, __file__, "--out", str(args.out), "--features", args.features, "--one", str(real),
                                str(synthetic), str(args.out / f"report_{n_real}_{n_synthetic}")],
                               capture_output=True, text=True)
        if child.returncode != 0:
            sys.exit(f"evaluate of {real} and {synthetic} failed:\n{child.stderr[-2000:]}")
        measured = json.loads(child.stdout.strip().splitlines()[-1])
        row = {"real": n_real, "synthetic": n_synthetic, "spacing_mm": args.spacing, "features": args.features,
               **measured, "seconds_per_volume_scored": round(measured["seconds"] / measured["volumes_scored"], 3),
               "seconds_per_synthetic_volume": round(measured["seconds"] / n_synthetic, 3),
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
        print(json.dumps(row), flush=True)
        with open(args.out / "benchmark.jsonl", "a") as log:
            log.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
