#!/usr/bin/env bash
# Time the README's main job as a new user meets it: a fresh clone in an empty venv, then the README's
# first command stage by stage (install, phantom, generate). docs/benchmarks.md records the results.
#   bash scripts/time_readme_job.sh [WORKDIR]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d)}
git clone -q "$repo" "$work/clone"
cd "$work/clone"
python -m venv venv
source venv/bin/activate
t0=$(date +%s.%N)
pip install -q torch==2.13.0 && pip install -q -e .
t1=$(date +%s.%N)
diffusion-glioma phantom --out runs/phantom --n-adult 2 --n-pediatric 1
t2=$(date +%s.%N)
diffusion-glioma generate --model weights/phantom-demo --masks runs/phantom --out runs/synthetic --per-mask 2
t3=$(date +%s.%N)
python -c "print(f'install {$t1-$t0:.0f} s, phantom {$t2-$t1:.0f} s, generate {$t3-$t2:.0f} s, total {$t3-$t0:.0f} s')"
echo "samples: $work/clone/runs/synthetic/samples.png"
