"""Entry point for `accelerate launch scripts/generate.py --model … --masks … --out …`: the masks are
split between processes. The same as `diffusion-glioma generate`."""

import sys

from diffusion_glioma.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
