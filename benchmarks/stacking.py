"""Stacking against Siril, same run, same files: mono lights and one-shot-colour (CFA) lights.

Each case writes N calibrated lights of one star field (dithered by whole and sub-pixel
shifts and a small rotation, Gaussian stars, sky and noise; a colour case through an RGGB
Bayer filter with stars of several colours) and times, as whole processes:

- ``ccdcal stack FILES -o OUT.fits`` (judge, register, stack; for CFA lights debayer first);
- Siril 1.0.6's script: ``convert`` (with ``-debayer`` for CFA), ``register``, ``stack rej 3 3
  -norm=addscale`` (its usual script);
- for mono lights, when astroalign is installed (``pip install -e ".[bench]"``), the Python peer
  ``benchmarks/peer_astroalign.py``: astroalign's registration and a numpy/astropy sigma-clipped
  mean, as a Python user writes them.

Quality, both stacks on frame 0's grid, on the same stars: star signal-to-noise, with the noise
measured as the scatter of aperture sums at the same blank positions (pixel rms flatters
smoothing interpolators), and the stars' FWHM. Reported as ratios ccdcal / Siril (and peer / Siril).

    python benchmarks/stacking.py [--cases mono,osc] [--n 16] [--size 1024x1536] [--repeat 1]
                                  [--variants '--debayer mhc --interpolation bilinear;--debayer rcd']
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from astropy.io import fits
from scipy.special import erf

ROOT = Path(__file__).resolve().parent
FWHM = 3.0


def _stars(shape: tuple[int, int], xy: np.ndarray, flux: np.ndarray) -> np.ndarray:
    ny, nx = shape
    sigma = FWHM / (2 * math.sqrt(2 * math.log(2)))
    image = np.zeros(shape, np.float32)
    for (x, y), f in zip(xy, flux, strict=True):
        x0, x1, y0, y1 = max(0, int(x) - 7), min(nx, int(x) + 8), max(0, int(y) - 7), min(ny, int(y) + 8)
        if x1 <= x0 or y1 <= y0:
            continue
        px = np.diff(0.5 * (1 + erf((np.arange(x0, x1 + 1) - 0.5 - x) / (sigma * math.sqrt(2)))))
        py = np.diff(0.5 * (1 + erf((np.arange(y0, y1 + 1) - 0.5 - y) / (sigma * math.sqrt(2)))))
        image[y0:y1, x0:x1] += (f * np.outer(py, px)).astype(np.float32)
    return image


def make_lights(folder: Path, n: int, shape: tuple[int, int], colour: bool, seed: int = 1) -> tuple[list[Path], np.ndarray]:
    """N calibrated lights (ADU above the sky's zero, gain 1) and the star catalogue (x, y on frame 0)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ny, nx = shape
    count = max(60, nx * ny // 12000)
    cat = np.column_stack([rng.uniform(20, nx - 20, count), rng.uniform(20, ny - 20, count),
                           np.exp(rng.uniform(math.log(2e3), math.log(8e4), count)),
                           rng.uniform(0.5, 1.6, count), rng.uniform(0.4, 1.4, count)])
    paths = []
    yy, xx = np.mgrid[0:ny, 0:nx]
    cell = (yy % 2) * 2 + (xx % 2)        # RGGB: 0 R, 1 and 2 G, 3 B
    for i in range(n):
        path = folder / f"light_{i:03d}.fits"
        paths.append(path)
        if path.exists():
            continue
        angle = math.radians(rng.uniform(-0.3, 0.3)) if i else 0.0
        dx, dy = (rng.uniform(-15, 15), rng.uniform(-15, 15)) if i else (0.0, 0.0)
        c, s = math.cos(angle), math.sin(angle)
        x = c * (cat[:, 0] - nx / 2) - s * (cat[:, 1] - ny / 2) + nx / 2 + dx
        y = s * (cat[:, 0] - nx / 2) + c * (cat[:, 1] - ny / 2) + ny / 2 + dy
        xy = np.column_stack([x, y])
        if colour:
            planes = [_stars(shape, xy, cat[:, 2] * k) for k in (cat[:, 3], np.ones(count), cat[:, 4])]
            signal = np.choose(np.array([0, 1, 1, 2])[cell], planes) + np.choose(np.array([0, 1, 1, 2])[cell],
                                                                                [180.0, 250.0, 200.0])
        else:
            signal = _stars(shape, xy, cat[:, 2]) + 250.0
        noise = rng.normal(0.0, 1.0, shape).astype(np.float32) * np.sqrt(25.0 + signal)
        data = (signal + noise).astype(np.float32)
        header = fits.Header([("EXPTIME", 60.0), ("MJD-OBS", 60000.0 + i / 1440), ("BUNIT", "adu"),
                              ("GAIN", 1.0, "[e-/adu] gain")])
        if colour:
            header["BAYERPAT"] = "RGGB"
            header["ROWORDER"] = "TOP-DOWN"
        fits.PrimaryHDU(data, header).writeto(path, overwrite=True)
    return paths, cat


def measure(command: list[str], cwd: Path | None = None) -> tuple[float, int, int]:
    """Wall time, peak RSS and exit code of one process. Dirty pages are flushed before the
    clock starts (os.sync, untimed): Siril writes about 1 GB without an fsync, whose writeback
    would otherwise fall into the next command's time."""
    os.sync()
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cwd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        print(f"  failed ({code}): {proc.stderr.read().decode(errors='replace')[-400:]}", file=sys.stderr)
    return wall, usage.ru_maxrss * 1024, code


def siril_run(paths: list[Path], work: Path, colour: bool) -> tuple[list[str], Path] | None:
    exe = shutil.which("siril-cli")
    if exe is None:
        return None
    if work.exists():
        shutil.rmtree(work)
    (work / "in").mkdir(parents=True)
    for i, p in enumerate(paths):
        os.symlink(p, work / "in" / f"light_{i + 1:05d}.fits")
    debayer = " -debayer" if colour else ""
    (work / "stack.ssf").write_text(
        "requires 1.0.0\nsetext fits\ncd in\n"
        f"convert light -out=../proc{debayer}\ncd ../proc\nregister light\n"
        "stack r_light rej 3 3 -norm=addscale -out=../siril_stack\n")
    return [exe, "-d", str(work), "-s", str(work / "stack.ssf")], work / "siril_stack.fits"


def _plane(path: Path) -> np.ndarray:
    data = fits.getdata(path).astype(np.float64)
    return data.mean(axis=0) if data.ndim == 3 else data


def quality(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float]:
    """Star SNR and FWHM of two stacks on one grid (both on frame 0's), as ratios ours / theirs, on
    the same stars: found in ours (unsaturated, unflagged), measured at the same positions in
    both; the noise is the scatter of aperture sums at the same blank positions in both (pixel
    rms flatters smoothing interpolators)."""
    import sep

    def prepared(image: np.ndarray) -> np.ndarray:
        img = np.ascontiguousarray(np.nan_to_num(image, nan=0.0), dtype=np.float64)
        return img - sep.Background(img).back()

    a, b = prepared(ours), prepared(theirs)
    objs = sep.extract(a, 8.0, err=float(1.4826 * np.median(np.abs(a - np.median(a)))))
    objs = objs[(objs["flag"] == 0) & (objs["peak"] < 0.9 * np.nanmax(a))]
    radius = 2.0 * FWHM
    ny, nx = a.shape
    rng = np.random.default_rng(0)
    bx, by = rng.uniform(30, nx - 30, 3000), rng.uniform(30, ny - 30, 3000)
    blank = np.min(np.hypot(bx[:, None] - objs["x"][None], by[:, None] - objs["y"][None]), axis=1) > 15
    out = []
    for image in (a, b):
        flux, _, _ = sep.sum_circle(image, objs["x"], objs["y"], radius)
        sky, _, _ = sep.sum_circle(image, bx[blank], by[blank], radius)
        noise = 1.4826 * np.median(np.abs(sky - np.median(sky)))
        half, _ = sep.flux_radius(image, objs["x"], objs["y"], np.full(len(objs), 6.0 * FWHM), 0.5)
        out.append((flux / noise, 2 * half))
    return float(np.median(out[0][0] / out[1][0])), float(np.median(out[0][1] / out[1][1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="mono,osc")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--size", default="1024x1536", help="ROWSxCOLS")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--variants", default="",
                        help="more ccdcal settings to time against the same Siril stack, ';' between them,"
                             " e.g. '--debayer mhc --interpolation bilinear;--debayer rcd'")
    args = parser.parse_args(argv)
    ny, nx = (int(v) for v in args.size.split("x"))
    rows = []
    for case in args.cases.split(","):
        colour = case == "osc"
        data = ROOT / "_data" / f"stack-{case}-{args.n}x{ny}x{nx}"
        paths, _ = make_lights(data / "lights", args.n, (ny, nx), colour)
        out = data / "out"
        out.mkdir(exist_ok=True)
        result = {"case": case, "frames": args.n, "size": f"{nx}x{ny}"}
        for _ in range(args.repeat):
            # frame 0 as the reference, as Siril takes it: both stacks on one grid
            wall, rss, code = measure([sys.executable, "-m", "ccdcal.cli", "stack", *map(str, paths), "-o",
                                       str(out / "ccdcal.fits"), "--reference", str(paths[0]), "--json"])
            if code == 0:
                result["ccdcal_s"] = min(result.get("ccdcal_s", 1e9), wall)
                result["ccdcal_mb"] = rss / 2**20
            siril = siril_run(paths, data / "siril", colour)
            if siril is not None:
                wall, rss, code = measure(siril[0])
                if code == 0:
                    result["siril_s"] = min(result.get("siril_s", 1e9), wall)
                    result["siril_mb"] = rss / 2**20
        if not colour and importlib.util.find_spec("astroalign") is not None:
            for _ in range(args.repeat):
                wall, rss, code = measure([sys.executable, str(ROOT / "peer_astroalign.py"), str(out / "peer.fits"),
                                           *map(str, paths)])
                if code == 0:
                    result["peer_s"] = min(result.get("peer_s", 1e9), wall)
                    result["peer_mb"] = rss / 2**20
        if "ccdcal_s" in result and "siril_s" in result:
            snr, fwhm = quality(_plane(out / "ccdcal.fits"), _plane(siril[1]))
            result.update(ratio=result["ccdcal_s"] / result["siril_s"], snr_ratio=snr, fwhm_ratio=fwhm)
            if "peer_s" in result:
                snr, fwhm = quality(_plane(out / "peer.fits"), _plane(siril[1]))
                result.update(peer_ratio=result["peer_s"] / result["siril_s"], peer_snr_ratio=snr,
                              peer_fwhm_ratio=fwhm)
        rows.append(result)
        print(result, flush=True)
        for k, variant in enumerate(v for v in args.variants.split(";") if v.strip()):
            extra = {"case": f"{case} {variant.strip()}", "frames": args.n, "size": f"{nx}x{ny}"}
            target = out / f"ccdcal-variant{k}.fits"
            for _ in range(args.repeat):
                wall, rss, code = measure([sys.executable, "-m", "ccdcal.cli", "stack", *map(str, paths), "-o",
                                           str(target), "--reference", str(paths[0]), "--json", *variant.split()])
                if code == 0:
                    extra["ccdcal_s"] = min(extra.get("ccdcal_s", 1e9), wall)
            if "ccdcal_s" in extra and "siril_s" in result:
                snr, fwhm = quality(_plane(target), _plane(siril[1]))
                extra.update(siril_s=result["siril_s"], ratio=extra["ccdcal_s"] / result["siril_s"], snr_ratio=snr,
                             fwhm_ratio=fwhm)
            rows.append(extra)
            print(extra, flush=True)
    nan = float("nan")
    print("\n| case | frames | size | ccdcal s | Siril s | time ratio | star SNR ratio | FWHM ratio |"
          " astroalign+numpy s | its time ratio | its SNR ratio | its FWHM ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['frames']} | {r['size']} | {r.get('ccdcal_s', nan):.1f} | "
              f"{r.get('siril_s', nan):.1f} | {r.get('ratio', nan):.2f} | "
              f"{r.get('snr_ratio', nan):.3f} | {r.get('fwhm_ratio', nan):.3f} | {r.get('peer_s', nan):.1f} | "
              f"{r.get('peer_ratio', nan):.2f} | {r.get('peer_snr_ratio', nan):.3f} | {r.get('peer_fwhm_ratio', nan):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
