"""Entry point for `accelerate launch scripts/train.py --config configs/pretrain_gbm.yaml [--resume]`.

The same as `diffusion-glioma train`; kept as a script because that is what accelerate launches.
"""

import sys

from diffusion_glioma.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
