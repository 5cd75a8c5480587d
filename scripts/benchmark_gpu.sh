#!/usr/bin/env bash
# The GPU rows of docs/benchmarks.md: research-size training and sampling, pixel vs wavelet space.
#   bash scripts/benchmark_gpu.sh core   results.jsonl   # the tables' rows (about 10 minutes on an H100)
#   bash scripts/benchmark_gpu.sh extras results.jsonl   # no checkpointing, channels-last, compile, fp32/TF32
# Each measurement runs in its own process (a clean peak-memory count; an out-of-memory ends only
# its own row) under a time limit, and appends one JSON line to the results file.
set -uo pipefail
group=${1:?core or extras}
out=${2:?results file}
cd "$(dirname "$0")/.."
b() { timeout "${LIMIT:-300}" python3 scripts/benchmark.py "$@" --out "$out" || echo "failed or timed out: $*" >&2; }
M=(--size 192 192 144 --precision bf16)
L=(--size 240 240 160 --precision bf16)
if [ "$group" = core ]; then
  for preset in medddpm wavelet; do b train --preset $preset "${M[@]}" --checkpointing; done
  b sample --preset medddpm "${M[@]}" --sampler dpm++ --steps 25
  b sample --preset medddpm "${M[@]}" --sampler ddim --steps 50 --repeats 2
  b sample --preset medddpm "${M[@]}" --sampler ddpm --steps 250 --warmup 0 --repeats 1
  b sample --preset wavelet "${M[@]}" --sampler dpm++ --steps 25
  b sample --preset wavelet "${M[@]}" --sampler ddim --steps 50 --repeats 2
  for preset in medddpm wavelet; do b train --preset $preset "${L[@]}" --checkpointing; done
  b sample --preset medddpm "${L[@]}" --sampler dpm++ --steps 25
  b sample --preset wavelet "${L[@]}" --sampler dpm++ --steps 25
  b wavelet --size 192 192 144 --repeats 10
  b wavelet --size 240 240 160 --repeats 10
else
  for preset in medddpm wavelet; do b train --preset $preset "${M[@]}"; done
  b train --preset medddpm "${M[@]}" --checkpointing --channels-last
  b train --preset wavelet "${M[@]}" --checkpointing --channels-last
  b train --preset medddpm --size 192 192 144 --precision fp32 --checkpointing
  LIMIT=240 b train --preset wavelet "${M[@]}" --checkpointing --compile --warmup 2
fi
