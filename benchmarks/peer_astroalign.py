"""The Python peer of the stacking benchmark: astroalign and numpy, as a Python user writes them.

Each light is registered onto the first with ``astroalign.register`` (triangle matching of
sep's sources, bicubic resampling by scikit-image; NaN outside a frame), backgrounds matched
additively (each frame's median to the first's), and the cube combined with astropy's
``sigma_clip`` (3σ about the median, σ from the sample, along the frames) and a masked mean.
Mono lights only: astroalign registers one plane.

    python benchmarks/peer_astroalign.py OUT.fits LIGHT [LIGHT ...]
"""

from __future__ import annotations

import sys

import astroalign
import numpy as np
from astropy.io import fits
from astropy.stats import sigma_clip


def main(argv: list[str]) -> int:
    output, paths = argv[0], argv[1:]
    reference = fits.getdata(paths[0]).astype(np.float32)
    frames = [reference]
    for path in paths[1:]:
        image = fits.getdata(path).astype(np.float32)
        registered, _ = astroalign.register(image, reference, fill_value=np.nan)
        frames.append(registered.astype(np.float32))
    cube = np.stack(frames)
    levels = np.nanmedian(cube[:, ::4, ::4].reshape(len(frames), -1), axis=1)
    cube += (levels[0] - levels)[:, None, None]
    clipped = sigma_clip(np.ma.masked_invalid(cube), sigma=3.0, axis=0, maxiters=5)
    stack = np.ma.mean(clipped, axis=0).filled(np.nan).astype(np.float32)
    fits.PrimaryHDU(stack).writeto(output, overwrite=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
