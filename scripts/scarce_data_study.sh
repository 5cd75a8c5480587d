#!/usr/bin/env bash
# The package's own question at the phantom's scale: real cases are scarce; does a generator trained on those
# scarce cases alone make volumes that help a segmenter trained on them? (docs/evaluation.md, "A generator trained
# on the half alone"). The half-real regime of scripts/segmentation_power_study.sh asks it with a generator that
# saw every case, which favours the volumes; here the generator sees only the half.
#   bash scripts/scarce_data_study.sh OUT MINUTES STEPS
# The scarce set is a random half of each disease's cases of the demo cohort (runs/phantom_train, 24 adults and 8
# children: 12 and 4), drawn by HALF_SEED (default 0) and linked into OUT/half. Diffusion trains on it alone
# (configs/demo.yaml, data.case_ids: the half) for MINUTES of training wall-clock, as the equal-compute study trains
# on all 32 (scripts/equal_compute_study.sh), then samples PER_MASK (default 2) volumes for each of the half's
# masks: its volumes bring new appearance, no new tumour layout. GENERATORS (default "diffusion"; "diffusion pix2pix
# vae cgan" adds the baselines, each from configs/NAME_demo.yaml at the same budget) are trained and sampled in turn.
# The segmentation study then trains, STEPS steps each, for every seed in SEEDS (default "0 1 2 3 4"), the half
# alone (the report's "real" regime, shared by every generator) and the half with each generator's volumes
# ("real+synthetic"), and tests them on the 30 phantoms of runs/phantom_segtest that neither a generator nor a
# segmenter saw: "real+synthetic - real" is the answer, paired per case with its interval.
# Equal wall-clock is equal training only on equally fast, equally idle cores: the steps the generator reached are
# printed, to set beside the 32-case generator's (1720 in its 32 minutes, runs/ec_curve/diffusion/budget_32min).
# Re-running resumes the training, the sampling and the segmenters (OUT/report/trained_models).
set -euo pipefail
out=$(realpath -m "${1:?output folder}")
minutes=${2:?training minutes of the generator}
steps=${3:?segmenter training steps}
half_seed=${HALF_SEED:-0} per_mask=${PER_MASK:-2}
[[ $minutes =~ ^[0-9]*[.]?[0-9]+$ && ! $minutes =~ ^[0.]+$ ]] || { echo "MINUTES: '$minutes' is not a positive number" >&2; exit 2; }
[[ $steps =~ ^[1-9][0-9]*$ ]] || { echo "STEPS: '$steps' is not a positive whole number" >&2; exit 2; }
[[ $half_seed =~ ^[0-9]+$ ]] || { echo "HALF_SEED: '$half_seed' is not a whole number" >&2; exit 2; }
[[ $per_mask =~ ^[1-9][0-9]*$ ]] || { echo "PER_MASK: '$per_mask' is not a positive whole number" >&2; exit 2; }
cd "$(dirname "$0")/.."
read -ra seeds <<< "${SEEDS:-0 1 2 3 4}"
read -ra generators <<< "${GENERATORS:-diffusion}"
for generator in "${generators[@]}"; do  # refused before any training
  [[ $generator == diffusion || ( $generator =~ ^[A-Za-z0-9._-]+$ && -f configs/${generator}_demo.yaml ) ]] \
    || { echo "GENERATORS: '$generator' is neither diffusion nor a baseline with configs/${generator}_demo.yaml" >&2; exit 2; }
done

# The phantom writes these files last: an interrupted cohort is finished, a whole one is not redrawn.
[ -f runs/phantom_train/phantom_cohort.json ] || diffusion-glioma phantom --out runs/phantom_train --n-adult 24 --n-pediatric 8 --spacing 3 --quiet
[ -f runs/phantom_segtest/phantom_cohort.json ] || diffusion-glioma phantom --out runs/phantom_segtest --n-adult 15 --n-pediatric 15 \
  --first-index 200 --spacing 3 --quiet
half=$out/half
if [ -d "$half" ]; then  # drawn before: by this seed, or the study would mix two scarce sets
  [ "$(cat "$out/half_seed" 2>/dev/null)" = "$half_seed" ] \
    || { echo "$half: drawn with HALF_SEED $(cat "$out/half_seed" 2>/dev/null || echo unknown), not $half_seed; use another OUT" >&2; exit 2; }
else  # the half's cases as hard links (no copy), and their ids, renamed into place when whole
  rm -rf "$half.tmp" && mkdir -p "$half.tmp"
  ( python - runs/phantom_train "$half.tmp" "$half_seed" <<'EOF'
import os, sys
from pathlib import Path

from diffusion_glioma.data.layouts import discover_cases
from diffusion_glioma.evaluation.segmentation import stratified_half

cohort, target, seed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
cases = [{"id": c.case_id, "disease": c.disease, "folder": c.seg.parent} for c in discover_cases(cohort)]
for case in stratified_half(sorted(cases, key=lambda c: c["id"]), seed):
    (target / case["folder"].name).mkdir()
    for file in case["folder"].iterdir():
        os.link(file, target / case["folder"].name / file.name)
    print(case["id"])  # the case id the training cache knows it by
EOF
  ) > "$out/half_case_ids.txt.tmp"
  cp runs/phantom_train/label_schemes.json "$half.tmp/"
  echo "$half_seed" > "$out/half_seed"
  mv "$out/half_case_ids.txt.tmp" "$out/half_case_ids.txt"
  mv "$half.tmp" "$half"
fi
ids=$(sed "s/.*/'&'/" "$out/half_case_ids.txt" | paste -sd, -)  # quoted: YAML reads every id as a string
names=() sets=()
for generator in "${generators[@]}"; do
  if [ "$generator" = diffusion ]; then  # its cosine schedule stretched over 10^6 steps: the budget ends the run
    config=configs/demo.yaml; schedule=(--steps 1000000)
  else
    config=configs/${generator}_demo.yaml; schedule=()
  fi
  run=$out/${generator}_on_half
  model=$run/budget_${minutes}min
  if [ ! -f "$model/training.json" ]; then
    diffusion-glioma train --config "$config" --output-dir "$run" --max-minutes "$minutes" "${schedule[@]}" \
      --set "data.case_ids=[$ids]" --resume
    rm -rf "$model.tmp"
    cp -r "$run/pipeline" "$model.tmp"
    mv "$model.tmp" "$model"
  fi
  echo "$generator: $(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["steps"])' "$model/training.json")" \
    "steps in $minutes minutes on $(wc -l < "$out/half_case_ids.txt") cases ($model)"
  synthetic=$out/synthetic_${generator}_${minutes}min_x$per_mask
  diffusion-glioma generate --model "$model" --masks "$half" --out "$synthetic" --per-mask "$per_mask" --quiet
  names+=("${generator}_on_half") sets+=("$synthetic")
done
diffusion-glioma evaluate --real "$half" --synthetic "${sets[@]}" --names "${names[@]}" \
  --segmentation-test runs/phantom_segtest --segmentation-seeds "${seeds[@]}" --segmentation-steps "$steps" \
  --segmentation-regimes real+synthetic --classification-steps 0 --anomaly-steps 0 --features random \
  --out "$out/report" --quiet
