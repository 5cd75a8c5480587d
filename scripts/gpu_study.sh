#!/usr/bin/env bash
# The GPU study of issue 24 in one command that fits a lent H100/H200 (about 9 minutes):
#   bash scripts/gpu_study.sh OUT
# 1. Diffusion (configs/demo.yaml's recipe, x0 with EDM's skip at sigma_data 0.25, and the same without the skip,
#    the row "no_skip")
#    against pix2pix on the phantom cohort at 64x80x64, 3 mm, each trained for MINUTES (default 1.5) of wall-clock and scored on 8 held-out masks against the phantom's
#    truth (scripts/equal_compute_study.sh; the report is OUT/report/report.md).
# 2. Sampling time of the default sampler (DPM-Solver++, 25 steps, bf16) at research size, 192x192x144 and
#    240x240x160, wavelet preset (OUT/sampling_time.jsonl; scripts/benchmark.py).
# Record the tables with this command in docs/evaluation.md and docs/benchmarks.md.
# The phantoms are drawn one subject at a time (about 3 s each at 3 mm, 72 subjects): draw them here first
# (the first lines of scripts/equal_compute_study.sh) and carry runs/phantom_train, runs/phantom_heldout and
# runs/phantom_heldout_truth (31 MB) to the GPU machine, so its minutes go to training and sampling.
set -euo pipefail
out=$(realpath -m "${1:?output folder}")
cd "$(dirname "$0")/.."
mkdir -p "$out"
start=$(date +%s)
MINUTES=${MINUTES:-1.5}
DEVICE=cuda DRAWS=4 RECIPES=${RECIPES-no_skip=diffusion.skip_sigma_data=null} bash scripts/equal_compute_study.sh "$out" "$MINUTES" > "$out/equal_compute.log" 2>&1 \
  || echo "equal-compute study failed: $out/equal_compute.log" >&2  # the timings below still run
for size in "192 192 144" "240 240 160"; do
  timeout 90 python3 scripts/benchmark.py sample --preset wavelet --size $size --precision bf16 --sampler dpm++ \
    --steps 25 --repeats 3 --out "$out/sampling_time.jsonl" || echo "sampling time at $size: failed or timed out" >&2
done
echo "gpu study: $(( $(date +%s) - start )) s; report $out/report/report.md, timings $out/sampling_time.jsonl"
