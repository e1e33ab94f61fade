"""The ``ccdcal`` command: parses arguments, calls the library, prints errors as one line.

Exit codes: 0 all done; 1 internal failure; 2 bad usage or input; 3 ``reduce``
finished what it could but skipped inputs or groups.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from . import __version__

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other usage error
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _pair(kind):
    def parse(text: str):
        parts = [p for p in text.replace(" ", "").split(",") if p]
        if len(parts) == 1:
            parts = parts * 2
        if len(parts) != 2:
            raise argparse.ArgumentTypeError(f"expected two numbers like LOW,HIGH, got {text!r}")
        try:
            return tuple(kind(p) for p in parts)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected two numbers like LOW,HIGH, got {text!r}") from exc

    return parse


# -- scan -----------------------------------------------------------------------------------
def _add_scan(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", help="files, folders or glob patterns")
    p.add_argument("--json", action="store_true", help="print the inventory as JSON")
    p.add_argument("--no-flags", action="store_true", help="skip the pixel checks that flag bad frames")


def _run_scan(args) -> int:
    from .planning.inventory import scan
    from .ui import print_inventory

    inventory = scan(args.paths, flag=not args.no_flags)
    if args.json:
        import json

        print(json.dumps(inventory.to_json(), indent=2))
    else:
        print_inventory(inventory)
    return EXIT_OK


# the library's names (io.headers.BAYER_PATTERNS, colour.demosaic.METHODS), spelled here so that
# `ccdcal --help` imports no numpy; tests/test_cli.py keeps them equal
BAYER_PATTERNS = ("RGGB", "BGGR", "GRBG", "GBRG")
DEBAYER_METHODS = ("bilinear", "mhc", "rcd")

# -- reduce ---------------------------------------------------------------------------------
def _add_reduce(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", help="raw files, folders or glob patterns")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--config", help="TOML file with any option below (command-line flags win)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    p.add_argument("--force", action="store_true", help="redo every output, even if up to date")
    p.add_argument("--strict", action="store_true", help="any skipped input or group is fatal")
    p.add_argument("--exclude-flagged", action="store_true", default=None,
                   help="leave out calibration frames flagged as outliers")
    p.add_argument("--memory", help="memory budget for stacking, e.g. 1GiB")
    p.add_argument("--combine", dest="combine_method", choices=["median", "mean"], help="master combine method")
    p.add_argument("--clip-extrema", type=_pair(int), metavar="NLOW,NHIGH")
    p.add_argument("--sigma-clip", type=_pair(float), metavar="LOW,HIGH",
                   help="rejection thresholds in sigma (default 3,3)")
    p.add_argument("--reject", choices=["auto", "ccdclip", "mad", "sigma", "winsorized", "percentile",
                                        "linear-fit", "none"],
                   help="master rejection (default auto: a noise-model clip from the measured read"
                        " noise and gain, which rejects cosmic rays at any number of frames)")
    p.add_argument("--keep-flagged", action="store_true", default=None,
                   help="keep bias/dark frames whose level is far off their group's in the masters")
    p.add_argument("--no-overscan", dest="overscan", action="store_false", default=None,
                   help="do not subtract the overscan even where the header has one")
    p.add_argument("--scale-region", metavar="[x1:x2,y1:y2]", help="region for flat levels")
    p.add_argument("--no-report", dest="report", action="store_false", default=None,
                   help="skip the HTML report and previews")
    p.add_argument("--stack", action="store_true", default=None,
                   help="also judge, register and stack the calibrated lights per target and filter"
                        " (stacked/<target>_<filter>.fits)")
    p.add_argument("--stack-keep-all", action="store_true", default=None,
                   help="with --stack: keep frames flagged cloudy, trailed or out of focus")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="run the tasks on dask: tcp://HOST:PORT (a running scheduler whose workers see the"
                        " same paths) or local:N (a LocalCluster of N processes); needs ccdcal[dask]")
    p.add_argument("--dask-report", action="store_true", default=None,
                   help="with --scheduler: save dask's performance report as OUT/dask-report.html")
    p.add_argument("--masters", metavar="DIR", action="append",
                   help="masters of earlier runs (ccdcal's own or marked as masters) for what the night lacks;"
                        " repeatable")
    p.add_argument("--flat-max-age", type=float, metavar="DAYS",
                   help="a flat of the --masters library further than this from a light is not used (default 30)")
    p.add_argument("--bayer-pattern", choices=BAYER_PATTERNS,
                   help="the Bayer pattern of colour frames whose header does not give one (BAYERPAT)")
    p.add_argument("--flat-cfa", choices=["channel", "scalar"],
                   help="colour flats: each CFA colour normalised to 1 (channel, default) or one level (scalar)")
    p.add_argument("--debayer", choices=DEBAYER_METHODS, help="how colour lights are debayered for --stack")
    _add_calibration_flags(p)


def _run_reduce(args) -> int:
    from .pipeline.run import ReduceOptions, reduce
    from .ui import print_plan, print_summary, track

    options = ReduceOptions.from_sources(args.config, vars(args))
    result = reduce(args.paths, args.output, options=options, dry_run=args.dry_run,
                    force=args.force, progress=track)
    if args.dry_run:
        print_plan(result.plan)
    else:
        print_summary(result)
    if result.skipped and options.strict:
        return EXIT_USAGE
    return EXIT_PARTIAL if result.skipped else EXIT_OK


# -- demo -----------------------------------------------------------------------------------
def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", nargs="?", default="demo-night", help="where to write the night (default: demo-night)")
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--size", type=int, default=512, help="image width/height in pixels")
    p.add_argument("--no-reduce", action="store_true", help="only write the raw night")


def _run_demo(args) -> int:
    from pathlib import Path

    from .demo import write_night
    from .pipeline.run import ReduceOptions, reduce
    from .ui import console, print_summary, track

    folder = Path(args.folder)
    raw = write_night(folder / "raw", seed=args.seed, size=args.size)
    console().print(f"[bold]synthetic night[/] written to {raw} (truth in {folder / 'truth'})")
    if args.no_reduce:
        return EXIT_OK
    result = reduce([raw], folder / "out", options=ReduceOptions(), progress=track)
    print_summary(result)
    console().print(f"[bold green]done.[/] calibrated lights in {folder / 'out' / 'calibrated'};"
                    f" open {(folder / 'out' / 'report.html').resolve()} in a browser")
    return EXIT_PARTIAL if result.skipped else EXIT_OK


# -- stats ----------------------------------------------------------------------------------
STATS_KEYS = ("path", "region", "npix", "mean", "median", "std", "min", "max",
              "clipped_mean", "clipped_median", "clipped_std")


def _add_stats(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="FILES", help="FITS files, folders or glob patterns")
    p.add_argument("--region", action="append", metavar="[x1:x2,y1:y2]",
                   help="IRAF section, 1-based and inclusive (repeat for several; default: whole frame)")
    p.add_argument("--sigma", type=float, default=3.0, help="clipping threshold for the clipped values")
    p.add_argument("--maxiters", type=int, default=5, help="clipping iterations")
    p.add_argument("--hdu", type=int, help="image HDU index (default: the first image)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print a JSON list, one object per file and region")
    fmt.add_argument("--csv", action="store_true", help="print CSV with a header row")


def _run_stats(args) -> int:
    import math

    from ._shared.names import printable
    from .errors import InputError
    from .io.frames import find_fits, read_image
    from .qa.stats import region_stats
    from .ui import warn

    rows = []
    paths = find_fits(args.paths)
    unread = 0
    for path in paths:
        try:
            data, _ = read_image(path, args.hdu)
        except InputError as exc:       # one unreadable file is that file's problem only
            if len(paths) == 1:
                raise
            warn(f"skipped {exc}")
            unread += 1
            continue
        for region in args.region or [None]:
            result = region_stats(data, region, sigma=args.sigma, maxiters=args.maxiters)
            rows.append({"path": str(path), **result.to_dict()})
    if args.json:
        import json

        clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                  for k, v in row.items()} for row in rows]
        print(json.dumps([{k: row[k] for k in STATS_KEYS} for row in clean], indent=2))
    elif args.csv:
        import csv

        writer = csv.DictWriter(sys.stdout, fieldnames=STATS_KEYS, extrasaction="ignore",
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    else:
        header = ("file", "region", "npix", "mean", "median", "std", "min", "max",
                  "clip mean", "clip median", "clip std")
        table = [header] + [
            (printable(r["path"]), r["region"], str(r["npix"]),
             *(f"{r[k]:.6g}" for k in STATS_KEYS[3:])) for r in rows
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        for row in table:
            print("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                            for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    if unread:
        return EXIT_PARTIAL if rows else EXIT_USAGE
    return EXIT_OK


# -- stretch --------------------------------------------------------------------------------
def _add_stretch(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="FILE", help="FITS image")
    p.add_argument("-o", "--output", required=True, metavar="OUT.png", help="PNG to write")
    p.add_argument("--method", default="autostf", choices=["autostf", "mtf", "mtf-rnc", "asinh", "linear"],
                   help="autostf (default): PixInsight/Siril auto-stretch; mtf: the notebook's midtone"
                        " transformation; mtf-rnc: mtf then the RNC S-curve twice; asinh; linear (zscale)")
    p.add_argument("--hdu", type=int, help="image HDU index (default: the first image)")
    p.add_argument("--bits", type=int, choices=[8, 16], default=8, help="PNG bit depth (default 8)")
    p.add_argument("--fits", action="store_true",
                   help="also write the stretched float image as OUT.fits next to the PNG")
    p.add_argument("--shadows", type=float, default=2.8,
                   help="autostf/mtf: shadows clip, in sigma below the background (default 2.8)")
    p.add_argument("--target", type=float, default=0.25,
                   help="autostf/mtf: where the background lands, 0..1 (default 0.25)")
    p.add_argument("--linked", action="store_true",
                   help="autostf on a colour image: one stretch for every colour (colours as recorded);"
                        " default: each colour its own (a neutral background)")
    p.add_argument("--softening", type=float, default=0.1, help="asinh: softening a, 0..1 (default 0.1)")
    p.add_argument("--limits", type=_pair(float), metavar="LOW,HIGH",
                   help="linear/asinh: data values mapped to black and white (default zscale)")
    p.add_argument("--no-flip", action="store_true", help="keep numpy row 0 at the top of the PNG")


def _run_stretch(args) -> int:
    from pathlib import Path

    from .errors import InputError
    from .io.frames import read_colour, read_image
    from .io.guard import refuse_overwrite
    from .io.writer import write_bytes, write_fits
    from .stretch import png_bytes, stretch

    if not 0.0 < args.target < 1.0:
        raise InputError(f"--target {args.target}: the background target must be between 0 and 1")
    if args.softening <= 0:
        raise InputError(f"--softening {args.softening}: must be positive")
    data, header = read_colour(args.path) if args.hdu is None else (None, None)
    if data is None:
        data, header = read_image(args.path, args.hdu)
    elif args.bits != 8 or args.fits:
        raise InputError(f"{args.path}: a colour image is written as an 8-bit colour PNG only (no --bits 16, --fits)")
    options: dict = {}
    if args.method == "autostf":
        options = {"shadows": args.shadows, "target": args.target}
    elif args.method in ("mtf", "mtf-rnc"):
        options = {"low_clip": args.shadows, "bg": args.target}
    elif args.method == "asinh":
        options = {"softening": args.softening, "limits": args.limits}
    elif args.method == "linear":
        options = {"limits": args.limits}
    out = Path(args.output)
    fits_out = out.with_suffix(".fits")
    refuse_overwrite([args.path], files=[out, fits_out] if args.fits else [out])
    stretched = stretch(data, args.method, linked=args.linked, **options)
    write_bytes(out, png_bytes(stretched, bits=args.bits, flip=not args.no_flip))
    print(f"wrote {out} ({args.method}, {args.bits}-bit)")
    if args.fits:
        write_fits(fits_out, stretched.astype("float32"), header)
        print(f"wrote {fits_out} (stretched values 0..1)")
    return EXIT_OK


# -- report ---------------------------------------------------------------------------------
def _add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", metavar="OUT", help="output folder of 'ccdcal reduce' (with manifest.json)")


def _run_report(args) -> int:
    from .report.page import build_report

    path = build_report(args.output)
    print(f"report: {path.resolve()}")
    return EXIT_OK


# -- verify ---------------------------------------------------------------------------------
def _add_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="an output folder of ccdcal reduce")


def _run_verify(args) -> int:
    from rich.markup import escape

    from ._shared.names import printable
    from .pipeline.run import verify
    from .ui import console, warn

    result = verify(args.folder)
    for rel, why in result.stale:
        warn(f"{rel}: stale, its inputs changed since ({why}); rerun reduce")
    for rel, why in result.problems:
        console().print(f"[red]BAD[/] {escape(printable(rel))}: {escape(printable(why))}")
    for rel in result.unlisted:
        warn(f"{rel}: a FITS file the manifest does not list (not made by this run, or left by another"
             " tool); not verified")
    console().print(f"{len(result.ok)} outputs verified, {len(result.problems)} bad, {len(result.stale)} stale"
                    + (f", {len(result.unlisted)} unlisted" if result.unlisted else ""))
    return EXIT_FAILURE if result.problems else EXIT_OK


# -- combine --------------------------------------------------------------------------------
def _add_combine(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="FILES", help="FITS files, folders or glob patterns")
    p.add_argument("-o", "--output", required=True, help="the combined FITS file to write")
    p.add_argument("--method", choices=["median", "mean", "sum"], default="median")
    p.add_argument("--clip-extrema", type=_pair(int), metavar="NLOW,NHIGH",
                   help="reject the NLOW lowest and NHIGH highest values of each pixel")
    p.add_argument("--sigma-clip", type=_pair(float), metavar="LOW,HIGH",
                   help="rejection thresholds (turns on --reject sigma)")
    p.add_argument("--reject", choices=["sigma", "mad", "winsorized", "percentile", "linear-fit",
                                        "ccdclip", "none"], help="rejection algorithm")
    p.add_argument("--center", choices=["median", "mean"], help="centre of the rejection (default median)")
    p.add_argument("--maxiters", type=int, help="most rejection passes (default: until none rejected)")
    p.add_argument("--scale", choices=["median", "mean", "clipped-mean", "none"],
                   help="scale every frame to the mean level (flats: median)")
    p.add_argument("--zero", choices=["median", "mean", "clipped-mean", "none"],
                   help="offset every frame to the mean level")
    p.add_argument("--scale-region", metavar="[x1:x2,y1:y2]", help="where levels are measured")
    p.add_argument("--weights", type=lambda t: [float(v) for v in t.split(",") if v.strip()],
                   metavar="W1,W2,...", help="per-frame weights of a mean or sum")
    p.add_argument("--gain", type=float, help="e-/ADU for --reject ccdclip (default: header GAIN)")
    p.add_argument("--read-noise", type=float, help="e- for --reject ccdclip (default: header RDNOISE)")
    p.add_argument("--sensitivity-noise", type=float, default=0.0, help="fraction, for --reject ccdclip")
    p.add_argument("--compat", choices=["ccdproc"], help="reproduce ccdproc.combine exactly")
    p.add_argument("--memory", default="1GiB", help="memory budget, e.g. 256MiB (default 1GiB)")


def _run_combine(args) -> int:
    from ._shared.names import printable
    from .combining.engine import combine
    from .io.frames import find_fits, header_value
    from .io.guard import refuse_overwrite
    from .io.writer import write_fits

    paths = find_fits(args.paths)
    refuse_overwrite(paths, files=[args.output])
    result = combine(paths, method=args.method, scale=args.scale, zero=args.zero,
                     scale_region=args.scale_region, clip_extrema=args.clip_extrema,
                     sigma_clip=args.sigma_clip, reject=args.reject, center=args.center,
                     maxiters=args.maxiters, weights=args.weights, gain=args.gain,
                     read_noise=args.read_noise, sensitivity_noise=args.sensitivity_noise,
                     memory=args.memory, compat=args.compat)
    unit = header_value(result.header, ("BUNIT",))
    out = write_fits(args.output, result.data, result.header, uncertainty=result.uncertainty,
                     mask=result.mask if result.mask.any() else None,
                     unit=unit if isinstance(unit, str) else None)
    rejected = int(result.nlow_rejected.sum()) + int(result.nhigh_rejected.sum())
    print(f"{printable(out)}: {len(paths)} frames, {args.method}; {rejected} values rejected,"
          f" {int(result.mask.sum())} pixels masked")
    return EXIT_OK


# -- calibrate ------------------------------------------------------------------------------
def _add_calibration_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by ``reduce`` and ``calibrate``; their names are ReduceOptions fields."""
    p.add_argument("--gain", type=float, help="e-/ADU (default: EGAIN, or GAIN when stated in e-/ADU;"
                   " reduce also measures it from two flats)")
    p.add_argument("--read-noise", type=float, help="e- (default: RDNOISE, else measured from two biases)")
    p.add_argument("--saturation", type=float, help="raw ADU (default: SATURATE/DATAMAX, else the ADC maximum)")
    p.add_argument("--electrons", dest="to_electrons", action="store_true", default=None,
                   help="convert the calibrated data to electrons (needs the gain)")
    p.add_argument("--no-uncertainty", dest="uncertainty", action="store_false", default=None,
                   help="do not write the UNCERT extension")
    p.add_argument("--dark-optimize", action="store_true", default=None,
                   help="scale the dark to minimise the noise of the result (factor in DARKSCAL)")
    p.add_argument("--cosmic-rays", action="store_true", default=None,
                   help="flag cosmic rays (astroscrappy) in MASK bit 8")
    p.add_argument("--bad-pixel-map", metavar="FITS", help="non-zero pixels are bad (MASK bit 16)")
    p.add_argument("--hot-sigma", type=float, help="hot pixel threshold in the master dark (default 5)")
    p.add_argument("--flat-norm", choices=["median", "clipped-mean"], help="level a master flat is divided by")
    p.add_argument("--flat-floor", type=float, help="flat pixels below this are masked (default 0.1)")
    p.add_argument("--allow-uncorrected", action="store_true", default=None,
                   help="calibrate lights even when no bias or dark removes their pedestal (marked UNCORR)")
    p.add_argument("--temp-tolerance", type=float, help="°C: temperatures closer than this are equal (default 2)")
    p.add_argument("--scale-darks", choices=["auto", "always", "never"],
                   help="scale a dark of another exposure (auto: CCDs yes, CMOS cameras no: their glow is not linear)")


def _add_calibrate(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", help="raw frames, folders or glob patterns")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--bias", help="master bias FITS")
    p.add_argument("--dark", nargs="+", help="bias-subtracted master dark(s); the nearest exposure is used,"
                   " preferring longer")
    p.add_argument("--flat", help="master flat FITS (normalised here when it has no FLATNORM)")
    p.add_argument("--biassec", metavar="[x1:x2,y1:y2]", help="overscan region (default: BIASSEC)")
    p.add_argument("--trimsec", metavar="[x1:x2,y1:y2]", help="region kept (default: TRIMSEC or DATASEC)")
    p.add_argument("--no-overscan", dest="overscan", action="store_false", default=True)
    p.add_argument("--overscan-model", default="legendre",
                   choices=["mean", "median", "legendre", "chebyshev", "spline"])
    p.add_argument("--overscan-order", type=int, default=3, help="polynomial order or spline pieces")
    p.add_argument("--overscan-axis", choices=["row", "column"],
                   help="one overscan value per row or per column (default: from the region's shape)")
    _add_calibration_flags(p)


def _run_calibrate(args) -> int:
    """``ccdcal calibrate``: the task ``reduce`` runs for each light, with the masters given here."""
    from .io.frames import find_fits
    from .notebook import calibrate_files
    from .pipeline.options import ReduceOptions
    from .ui import console, warn

    options = ReduceOptions.from_sources(None, vars(args))
    errors: list[str] = []
    written = calibrate_files(find_fits(args.paths), args.output, bias=args.bias, darks=args.dark or [],
                              flat=args.flat, options=options, errors=errors, biassec=args.biassec,
                              trimsec=args.trimsec, overscan=args.overscan, overscan_model=args.overscan_model,
                              overscan_order=args.overscan_order, overscan_axis=args.overscan_axis)
    for line in errors:
        warn(line)
    console().print(f"calibrated {len(written)} frame(s) into {args.output}"
                    + (f"; {len(errors)} failed" if errors else ""))
    if not written:
        return EXIT_USAGE
    return EXIT_PARTIAL if errors else EXIT_OK


# -- stack ----------------------------------------------------------------------------------
def _add_stack(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", help="calibrated lights (files, folders or globs)")
    p.add_argument("-o", "--output", required=True, help="the stack (FITS); a PNG preview is written next to it")
    p.add_argument("--reference", help="the frame whose grid and WCS the stack keeps (default: the best)")
    p.add_argument("--reject", choices=["auto", "noise", "none"], default="auto",
                   help="noise-model rejection from each frame's UNCERT (default auto)")
    p.add_argument("--weights", choices=["noise", "none"], default="noise",
                   help="inverse background variance (default) or equal")
    p.add_argument("--interpolation", choices=["lanczos3", "bicubic", "bilinear"], default="lanczos3",
                   help="resampling kernel (bilinear: smoother noise, stars ~4%% wider, faster)")
    p.add_argument("--keep-all", action="store_true", help="keep frames flagged as cloudy, trailed or out of focus")
    p.add_argument("--memory", default="1GiB", help="memory budget, e.g. 256MiB (default 1GiB)")
    p.add_argument("--debayer", choices=DEBAYER_METHODS, default="bilinear",
                   help="how colour (CFA) frames are debayered: bilinear (default), mhc (Malvar-He-Cutler) or rcd (ratio corrected: sharpest stars, slower)")
    p.add_argument("--bayer-pattern", choices=BAYER_PATTERNS,
                   help="the Bayer pattern of colour frames whose header does not give one")
    p.add_argument("--json", action="store_true", help="print the frames table as JSON")


def _run_stack(args) -> int:
    import json

    from .io.frames import find_fits
    from .stacking.helper import start_helper

    paths = find_fits(args.paths)
    helper = start_helper([str(p) for p in paths])     # it imports while this process does
    from .stacking.workflow import stack_files
    from .ui import print_stack, track

    run = stack_files(paths, args.output, reference=args.reference, reject=args.reject,
                      weights=args.weights, interpolation=args.interpolation, keep_all=args.keep_all,
                      memory=args.memory, progress=None if args.json else track, debayer=args.debayer,
                      bayer_pattern=args.bayer_pattern, judge_helper=helper)
    if args.json:
        print(json.dumps({"output": str(run.output), "frames": [f.to_json() for f in run.frames]}, indent=1))
    else:
        print_stack(run)
    return EXIT_OK


# -- debayer -------------------------------------------------------------------------------
def _add_debayer(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", help="calibrated colour (CFA) frames: files, folders or globs")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for the RGB cubes (<name>_rgb.fits)")
    p.add_argument("--method", choices=DEBAYER_METHODS, default="bilinear",
                   help="bilinear (default), mhc (Malvar-He-Cutler: sharper edges) or rcd (ratio corrected: sharpest, as Siril's default)")
    p.add_argument("--bayer-pattern", choices=BAYER_PATTERNS,
                   help="the pattern of frames whose header does not give one")


def _run_debayer(args) -> int:
    from pathlib import Path

    from ._shared.names import NameBook, printable, safe_part
    from .colour.demosaic import debayer_file
    from .errors import InputError
    from .io.frames import file_stem, find_fits
    from .io.guard import output_lock, refuse_overwrite
    from .ui import warn

    files = find_fits(args.paths)
    if not files:
        raise InputError("no FITS files found; check the path")
    out = Path(args.output)
    # as calibrate -o: the folder holds no input (so no output can write over one), one run at a time
    refuse_overwrite(files, folders=[out])
    out.mkdir(parents=True, exist_ok=True)
    names = NameBook()      # two inputs named alike (in two folders) get two outputs
    errors = 0
    with output_lock(out):
        for path in files:
            name = names.claim(f"{safe_part(file_stem(path))}_rgb.fits", str(path.resolve()))
            try:
                written = debayer_file(path, out / name, method=args.method, pattern=args.bayer_pattern)
                print(printable(str(written)))
            except InputError as exc:
                warn(str(exc))
                errors += 1
    if errors == len(files):
        return EXIT_USAGE
    return EXIT_PARTIAL if errors else EXIT_OK


COMMANDS = {
    "scan": (_add_scan, _run_scan, "list what is in a folder of raw frames"),
    "reduce": (_add_reduce, _run_reduce, "build masters and calibrate every light"),
    "demo": (_add_demo, _run_demo, "write a synthetic night with known truth and reduce it"),
    "verify": (_add_verify, _run_verify, "check a reduce output folder against its manifest and checksums"),
    "stats": (_add_stats, _run_stats, "region statistics of FITS images (imexamine-style)"),
    "stretch": (_add_stretch, _run_stretch, "write a stretched PNG preview of a FITS image"),
    "report": (_add_report, _run_report, "rebuild OUT/report.html from OUT/manifest.json"),
    "combine": (_add_combine, _run_combine, "stack FITS frames (median/mean/sum with rejection) into one"),
    "calibrate": (_add_calibrate, _run_calibrate, "calibrate frames with given masters (overscan, bias, dark, flat)"),
    "stack": (_add_stack, _run_stack, "judge, register and stack calibrated lights into one deep image"),
    "debayer": (_add_debayer, _run_debayer, "make RGB cubes of calibrated colour (CFA) frames"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ccdcal", description="Calibrate astronomical CCD/CMOS frames.")
    parser.add_argument("--version", action="version", version=f"ccdcal {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (add, _run, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", help="show tracebacks")
        add(p)
    return parser


@contextlib.contextmanager
def _warnings_on_stderr():
    """Render the library's warnings as one 'warning:' line each (once per message)."""
    import warnings

    from .errors import CcdcalWarning

    def show(message, category, filename, lineno, file=None, line=None):
        from .ui import warn

        if issubclass(category, CcdcalWarning):
            warn(str(message))
        else:
            warn(f"{category.__name__}: {message}")

    with warnings.catch_warnings():
        warnings.simplefilter("default", CcdcalWarning)
        warnings.showwarning = show
        yield


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    from ._shared.names import printable
    from .errors import CcdcalError

    try:
        with _warnings_on_stderr():
            return COMMANDS[args.command][1](args)
    except CcdcalError as exc:
        if args.debug:
            raise
        print(f"error: {printable(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence: no traceback without --debug
        if args.debug:
            raise
        print(f"internal error: {type(exc).__name__}: {printable(exc)} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_FAILURE


def entry() -> NoReturn:
    """The ``ccdcal`` command: :func:`main` in a process that is ours alone, so its allocator
    keeps freed frames for the next ones (:func:`ccdcal._shared.memory.keep_freed_memory`), and that
    ends without the interpreter's teardown once its output is flushed (:func:`_exit_now`)."""
    from ._shared.memory import keep_freed_memory

    keep_freed_memory()
    _exit_now(main())


def _exit_now(code: int) -> NoReturn:
    """End the command's process with ``code`` once stdout and stderr are flushed, skipping the
    interpreter's teardown: freeing every module, numba's compiled code and the frames the
    allocator kept took ~0.3 s after a 4k night. Nothing is lost: every file the command wrote
    is closed (and synced) by then, and its thread pools and clusters are shut down."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # a closed pipe (ccdcal ... | head): nothing more to say
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(entry())
