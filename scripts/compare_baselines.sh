#!/usr/bin/env bash
# The baseline comparison at phantom scale: diffusion vs the proposal's cGAN vs the pix2pix-style GAN
# vs the VAE, each trained on the same 25 phantom cases with the same budget (1000 steps, batch 2,
# configs/comparison/*.yaml), each sampling the masks of the same 8 held-out phantoms, scored in one
# report. Re-running resumes every stage. Usage: bash scripts/compare_baselines.sh [OUT]
set -euo pipefail
out=${1:-runs/comparison}
[ -d runs/phantom_transfer ] || diffusion-glioma phantom --out runs/phantom_transfer --n-adult 16 --n-pediatric 9 --spacing 3 --quiet
[ -d runs/phantom_heldout ] || diffusion-glioma phantom --out runs/phantom_heldout --n-adult 4 --n-pediatric 4 --first-index 100 --quiet
for kind in diffusion cgan pix2pix vae; do
  diffusion-glioma train --config "configs/comparison/$kind.yaml" --output-dir "$out/$kind" --resume
  diffusion-glioma generate --model "$out/$kind/pipeline" --masks runs/phantom_heldout --out "$out/synthetic_$kind" --quiet
done
diffusion-glioma evaluate --real runs/phantom_heldout \
  --synthetic "$out/synthetic_diffusion" "$out/synthetic_cgan" "$out/synthetic_pix2pix" "$out/synthetic_vae" \
  --names diffusion cgan pix2pix vae --out "$out/report" --features "${FEATURES:-auto}" --max-slices 4 \
  --segmentation-steps 150 --anomaly-steps 0 --quiet
