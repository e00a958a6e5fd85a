"""Blur QC on generated slides with a known out-of-focus half: precision / recall of the veto.

    PYTHONPATH=scripts python scripts/bench/bench_blur.py [outdir]

For each defocus (Gaussian sigma in microns) a 3072 x 2048 demo H&E slide (0.5 um/px) is written
with its right half blurred, tiled at 20x and 10x, filtered with the default tissue settings, and
the blurred tiles (>= half the tile in the region, tissue, with a focus score) are compared with the
veto's. Prints one Markdown table row per (sigma, magnification).
"""

import sys
import tempfile
from pathlib import Path

from slidesnake.focus import blurred_demo_slide, precision_recall
from slidesnake.tiling import tile_slide
from slidesnake.tissue import TissueParams, filter_slide


def main(outdir: str | None = None) -> None:
    out = Path(outdir or tempfile.mkdtemp())
    params = TissueParams()
    print(f"| sigma (um) | magnification | tiles judged | blurred (truth) | flagged | precision | recall |")
    print("|---|---|---|---|---|---|---|")
    for sigma in (0.5, 1.0, 2.0):
        path = out / f"blur-{sigma:g}.svs"
        truth = blurred_demo_slide(path, 3072, 2048, sigma_um=sigma)
        grid, meta = tile_slide(path, "blur", magnifications=[20, 10], tile_size=224)
        tiles = filter_slide(str(path), meta, grid, params, thumbnail_size=256).tiles
        for mag in (20, 10):
            t = tiles[(tiles["magnification"] == mag) & tiles["tissue"] & tiles["focus_score"].notna()]
            pr = precision_recall(t, truth, t["blurred"].to_numpy())
            print(f"| {sigma:g} | {mag}x | {pr['tiles']} | {pr['blurred']} | {pr['flagged']} | "
                  f"{pr['precision']:.2f} | {pr['recall']:.2f} |")


if __name__ == "__main__":
    main(*sys.argv[1:])
