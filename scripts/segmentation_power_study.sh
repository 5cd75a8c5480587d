#!/usr/bin/env bash
# The segmentation study with the power to rank generators (docs/evaluation.md, "The segmentation study"):
# 30 test phantoms that no generator or segmenter saw, 5 training seeds on that one fixed split, each
# segmenter trained STEPS steps (a budget the learning curve shows is within 0.01 WT Dice of its plateau:
# scripts/segmentation_learning_curve.py), the real regime trained once per seed and shared by every set.
#   bash scripts/segmentation_power_study.sh OUT STEPS
# MODELS="NAME=PIPELINE ..." (default: diffusion=weights/phantom-demo) are the generators; each samples
# one volume per mask of the training cohort (the synthetic regimes' data) and of the test cohort (the
# mask-consistency volumes, which nothing trains on). SEEDS (default "0 1 2 3 4"), SCHEDULE (the segmenters'
# learning rate: constant, the default, or poly, nnU-Net's decay, not ahead of it by 3200 steps:
# docs/evaluation.md). REGIMES (comma-separated, default all: "synthetic,real+synthetic,half real+synthetic")
# are the training mixes beside the real one ("half real+synthetic" brings the half alone, "half real", to compare
# it with); CLASSIFICATION_STEPS (default STEPS, 0: none) trains the disease
# classifiers. The phantom cohorts are the repository's runs/phantom_train and runs/phantom_segtest (drawn when
# missing, shared with the other studies). Re-running resumes the phantoms, the sampling and the training
# (every trained segmenter and classifier is kept in OUT/report/trained_models: a run extended by another model
# trains only that model's regimes).
set -euo pipefail
out=$(realpath -m "${1:?output folder}")
steps=${2:?segmenter training steps}
[[ $steps =~ ^[1-9][0-9]*$ ]] || { echo "STEPS: '$steps' is not a positive whole number" >&2; exit 2; }
read -ra rows <<< "${MODELS:-diffusion=$(dirname "$0")/../weights/phantom-demo}"
models=()
for row in "${rows[@]}"; do  # pipeline folders as the caller named them, before the cd below
  [[ $row =~ ^[A-Za-z0-9._-]+=. && -d ${row#*=} ]] || { echo "MODELS: '$row' is not NAME=PIPELINE (a folder)" >&2; exit 2; }
  models+=("${row%%=*}=$(realpath "${row#*=}")")
done
cd "$(dirname "$0")/.."
read -ra seeds <<< "${SEEDS:-0 1 2 3 4}"
IFS=, read -ra regimes <<< "${REGIMES:-synthetic,real+synthetic,half real+synthetic}"
classification_steps=${CLASSIFICATION_STEPS:-$steps}

# The phantom writes these files last: an interrupted cohort is finished, a whole one is not redrawn.
[ -f runs/phantom_train/phantom_cohort.json ] || diffusion-glioma phantom --out runs/phantom_train --n-adult 24 --n-pediatric 8 --spacing 3 --quiet
[ -f runs/phantom_segtest/phantom_cohort.json ] || diffusion-glioma phantom --out runs/phantom_segtest --n-adult 15 --n-pediatric 15 \
  --first-index 200 --spacing 3 --quiet
# One folder of both cohorts' cases (hard links: no copy) for one generate call per model.
masks=$out/masks
if [ ! -d "$masks" ]; then
  rm -rf "$masks.tmp" && mkdir -p "$masks.tmp"
  for case in runs/phantom_train/*/ runs/phantom_segtest/*/; do cp -al "$case" "$masks.tmp/"; done
  cp runs/phantom_train/label_schemes.json "$masks.tmp/"  # the phantoms' label schemes (both cohorts')
  mv "$masks.tmp" "$masks"
fi
names=() sets=()
for row in "${models[@]}"; do
  diffusion-glioma generate --model "${row#*=}" --masks "$masks" --out "$out/synthetic_${row%%=*}" --quiet
  names+=("${row%%=*}") sets+=("$out/synthetic_${row%%=*}")
done
diffusion-glioma evaluate --real runs/phantom_train --synthetic "${sets[@]}" --names "${names[@]}" \
  --segmentation-test runs/phantom_segtest --segmentation-seeds "${seeds[@]}" --segmentation-steps "$steps" \
  --segmentation-schedule "${SCHEDULE:-constant}" --segmentation-regimes "${regimes[@]}" \
  --classification-steps "$classification_steps" --anomaly-steps 0 --features random --out "$out/report" --quiet
