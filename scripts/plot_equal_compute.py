"""The equal-compute learning curve from an `evaluate` report: FID 3D (with its bootstrap interval), the
spread of a mask's draws over the truth's and the two-draw ratio, against training wall-clock, per
generator, beside the reference rows (the truth draws, the conditional mean, mean-fill).

    python scripts/plot_equal_compute.py runs/equal_compute/report/report.json OUT.png \
        diffusion=33 pix2pix_13min=12.7 pix2pix_26min=26.4 pix2pix=33.0

Each NAME=MINUTES names a set of the report and its generator's training wall-clock; sets whose names
differ only by a trailing _<N>min are one generator's curve (pix2pix_13min and pix2pix are one).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from diffusion_glioma.figures import pyplot, save_png

REFERENCES = {"same-mask truth draws": ("truth draws", "black"),
              "conditional mean (mean of the truth draws)": ("conditional mean", "tab:purple"),
              "mean-fill inside the head": ("mean-fill", "tab:gray")}


def main(argv: list[str]) -> int:
    report, out, *pairs = argv
    results = json.loads(Path(report).read_text())
    curves: dict[str, list] = {}
    for pair in pairs:
        name, minutes = pair.split("=")
        generator = re.sub(r"_\d+min$", "", name)
        curves.setdefault(generator, []).append((float(minutes), results["sets"][name]))
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    columns = [("FID 3D (lower is closer)", lambda s: s["fid_3d"]),
               ("spread of a mask's draws / truth's (1 right)", lambda s: s["conditional"]["spread_ratio"]["mean"]),
               ("two-draw ratio (1 sampler, 0 regressor)", lambda s: s["conditional"]["two_draw_ratio"]["mean"])]
    for ax, (title, value) in zip(axes, columns):
        for generator, points in sorted(curves.items()):
            points.sort(key=lambda p: p[0])
            xs, ys = [p[0] for p in points], [value(p[1]) for p in points]
            line = ax.plot(xs, ys, "o-", label=generator)[0]
            if title.startswith("FID"):
                for x, (_, s) in zip(xs, points):
                    low, high = s["fid_3d_ci95"]
                    ax.vlines(x, low, high, color=line.get_color(), alpha=0.4)
        for name, (label, colour) in REFERENCES.items():
            ref = results["references"].get(name)
            if ref is None:
                continue
            try:
                y = value(ref)
            except (KeyError, TypeError):
                continue
            if y is not None:
                ax.axhline(y, ls="--", color=colour, lw=1, label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training wall-clock (minutes, 2 CPU cores)", fontsize=8)
    axes[0].legend(fontsize=7)
    fig.suptitle("Equal compute on the phantom benchmark: 8 held-out masks x 4 draws", fontsize=9)
    fig.tight_layout()
    save_png(fig, out)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
