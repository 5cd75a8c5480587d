#!/usr/bin/env bash
# Diffusion against the GAN and VAE baselines at equal training wall-clock on the phantom benchmark, scored on
# held-out masks against the phantom's known truth (docs/evaluation.md, "Diffusion against pix2pix at equal
# wall-clock"). The budget is the run's whole training wall-clock (resumes included), checkpoints and
# validation figures included, checked every log_every steps.
#   bash scripts/equal_compute_study.sh OUT MINUTES
#   bash scripts/equal_compute_study.sh OUT "8 16 32"     # a learning curve: budgets of one run per generator
# Every generator trains on the demo cohort at 64x80x64, 3 mm (configs/demo.yaml, and configs/NAME_demo.yaml for
# each baseline in BASELINES, default "pix2pix"; BASELINES="pix2pix cgan vae" adds the cGAN and the VAE) for
# MINUTES of wall-clock each (`--max-minutes`; a finished run is not trained again; the diffusion config's
# cosine schedule is stretched over STEPS, default 10^6, so that the budget, not the schedule, ends the run), then sample DRAWS volumes for each
# of the 8 held-out masks and are scored by `evaluate --truth`: FID/KID 3D with intervals, the spread of a
# mask's draws over the truth's, the two-draw ratio and the correlation with the real case, beside the
# reference rows (same-mask truth draws, their conditional mean, mean-fill, noise). Re-running resumes.
# Several MINUTES (ascending) are checkpoints of one run per generator: it trains to the first budget, its
# pipeline is kept as OUT/GENERATOR/budget_<M>min, then it resumes to the next (the learning rate is constant
# past warm-up, so this is the same run a single long one would be). Rows are GENERATOR_<M>min, the largest
# budget's row plain GENERATOR (the naming scripts/plot_equal_compute.py reads as one curve).
# RECIPES="NAME=KEY=VALUE[,KEY=VALUE] ..." adds diffusion rows trained here under the same budget with
# configs/demo.yaml and those overrides (RECIPES="no_skip=diffusion.skip_sigma_data=null" drops EDM's skip; no
# spaces or commas inside a value);
# EXTRA_MODELS="NAME=PIPELINE ..." adds rows trained elsewhere; DIFFUSION_MODEL=PIPELINE scores an already trained
# diffusion pipeline folder instead of training one; DEVICE=cuda samples on a GPU.
set -euo pipefail
out=$(realpath -m "${1:?output folder}")
read -ra budgets <<< "${2:?training minutes per generator (one budget, or several ascending)}"
previous=0
for m in "${budgets[@]}"; do  # refused before any training, as the row names below are
  [[ $m =~ ^[0-9]+([.][0-9]+)?$ ]] && awk -v a="$m" -v b="$previous" 'BEGIN { exit !(a > b) }' \
    || { echo "MINUTES: '$2' is not a list of ascending positive numbers" >&2; exit 2; }
  previous=$m
done
cd "$(dirname "$0")/.."
steps=${STEPS:-1000000}
draws=${DRAWS:-4}
read -ra baselines <<< "${BASELINES:-pix2pix}"
[ ${#baselines[@]} -gt 0 ] || { echo "BASELINES: name at least one baseline (pix2pix, cgan, vae)" >&2; exit 2; }
for baseline in "${baselines[@]}"; do
  [[ $baseline =~ ^[A-Za-z0-9._-]+$ && -f configs/${baseline}_demo.yaml ]] \
    || { echo "BASELINES: '$baseline' has no configs/${baseline}_demo.yaml" >&2; exit 2; }
done
# Refuse a malformed row or a clash of row names (budget rows such as diffusion_8min included) before any training.
for row in ${RECIPES:-} ${EXTRA_MODELS:-}; do
  [[ $row =~ ^[A-Za-z0-9._-]+=. ]] || { echo "RECIPES/EXTRA_MODELS: '$row' is not NAME=... (a name of letters, digits, . _ -)" >&2; exit 2; }
done
for recipe in ${RECIPES:-}; do
  [[ ${recipe#*=} == ?*=* ]] || { echo "RECIPES: '$recipe' is not NAME=KEY=VALUE" >&2; exit 2; }
done
declare -A seen=()
claim_row() {
  [ -z "${seen[$1]:-}" ] || { echo "BASELINES/RECIPES/EXTRA_MODELS: $1 is already a row" >&2; exit 2; }
  seen[$1]=1
}
for generator in diffusion "${baselines[@]}" ${RECIPES:-}; do
  generator=${generator%%=*}
  claim_row "$generator"
  for m in "${budgets[@]::${#budgets[@]}-1}"; do claim_row "${generator}_${m}min"; done
done
for extra in ${EXTRA_MODELS:-}; do claim_row "${extra%%=*}"; done
# The phantom writes these files last: an interrupted cohort is finished, a whole one is not redrawn.
[ -f runs/phantom_train/phantom_cohort.json ] || diffusion-glioma phantom --out runs/phantom_train --n-adult 24 --n-pediatric 8 --spacing 3 --quiet
[ -f runs/phantom_heldout_truth/manifest.jsonl ] || diffusion-glioma phantom --out runs/phantom_heldout --n-adult 4 --n-pediatric 4 \
  --first-index 100 --spacing 3 --truth-draws 4 --truth-out runs/phantom_heldout_truth --quiet
declare -A model
names=()
# train_budgets GENERATOR CONFIG [train options]: one run trained to each budget in turn, each budget's
# pipeline copied aside (to a temporary name, then renamed: a half-copied budget is never scored).
train_budgets() {
  local name=$1 config=$2 m row
  shift 2
  for m in "${budgets[@]}"; do
    row=$name; [ "$m" = "${budgets[-1]}" ] || row=${name}_${m}min
    if [ ! -f "$out/$name/budget_${m}min/training.json" ]; then
      diffusion-glioma train --config "$config" --output-dir "$out/$name" --max-minutes "$m" --resume "$@"
      rm -rf "$out/$name/budget_${m}min.tmp"
      cp -r "$out/$name/pipeline" "$out/$name/budget_${m}min.tmp"
      mv "$out/$name/budget_${m}min.tmp" "$out/$name/budget_${m}min"
    fi
    model[$row]=$out/$name/budget_${m}min
    names+=("$row")
  done
}
if [ -n "${DIFFUSION_MODEL:-}" ]; then
  model[diffusion]=$DIFFUSION_MODEL
  names+=(diffusion)
else
  train_budgets diffusion configs/demo.yaml --steps "$steps"
fi
for baseline in "${baselines[@]}"; do
  train_budgets "$baseline" "configs/${baseline}_demo.yaml"
done
for recipe in ${RECIPES:-}; do  # NAME=KEY=VALUE[,KEY=VALUE]: a diffusion recipe at the same budgets
  settings=()
  IFS=, read -ra overrides <<< "${recipe#*=}"
  for kv in "${overrides[@]}"; do settings+=(--set "$kv"); done
  train_budgets "${recipe%%=*}" configs/demo.yaml --steps "$steps" "${settings[@]}"
done
for extra in ${EXTRA_MODELS:-}; do  # NAME=PIPELINE rows trained elsewhere (an older recipe, say)
  model[${extra%%=*}]=${extra#*=}
  names+=("${extra%%=*}")
done
sets=()
for kind in "${names[@]}"; do
  diffusion-glioma generate --model "${model[$kind]}" --masks runs/phantom_heldout --out "$out/synthetic_$kind" \
    --per-mask "$draws" ${DEVICE:+--device "$DEVICE"} --quiet
  sets+=("$out/synthetic_$kind")
done
diffusion-glioma evaluate --real runs/phantom_heldout --synthetic "${sets[@]}" \
  --names "${names[@]}" --truth runs/phantom_heldout_truth --out "$out/report" --features random \
  --segmentation-steps "${SEGMENTATION_STEPS:-0}" --quiet
