#!/usr/bin/env bash
# The baseline comparison at phantom scale: diffusion vs the proposal's cGAN vs the pix2pix-style GAN
# vs the VAE, each trained on the same 25 phantom cases with the same budget (1000 steps, batch 2,
# configs/comparison/*.yaml), each sampling two volumes for each mask of the same 16 held-out phantoms
# (8 adult, 8 pediatric; two per mask to expose a generator that ignores its noise), scored in one
# report with the segmentation study over three seeds. Re-running resumes every stage.
# Usage: bash scripts/compare_baselines.sh [OUT]
set -euo pipefail
out=${1:-runs/comparison}
[ -d runs/phantom_transfer ] || diffusion-glioma phantom --out runs/phantom_transfer --n-adult 16 --n-pediatric 9 --spacing 3 --quiet
held_out=runs/phantom_heldout16
[ -d $held_out ] || diffusion-glioma phantom --out $held_out --n-adult 8 --n-pediatric 8 --first-index 100 --quiet
for kind in diffusion cgan pix2pix vae; do
  diffusion-glioma train --config "configs/comparison/$kind.yaml" --output-dir "$out/$kind" --resume
  diffusion-glioma generate --model "$out/$kind/pipeline" --masks $held_out --out "$out/synthetic_$kind" \
    --per-mask 2 --quiet
done
diffusion-glioma evaluate --real $held_out \
  --synthetic "$out/synthetic_diffusion" "$out/synthetic_cgan" "$out/synthetic_pix2pix" "$out/synthetic_vae" \
  --names diffusion cgan pix2pix vae --out "$out/report" --features "${FEATURES:-auto}" --max-slices 4 \
  --segmentation-steps 150 --segmentation-seeds 0 1 2 --anomaly-steps 0 --quiet
