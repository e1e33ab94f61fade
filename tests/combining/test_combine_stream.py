"""Streaming combine: files and row sources, any tile size, memory bound, header, errors, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from astropy.io import fits
from hypothesis import given, settings
from hypothesis import strategies as st

from ccdcal.cli import main
from ccdcal.combining.engine import combine
from ccdcal.combining.options import parse_memory
from ccdcal.errors import InputError
from ccdcal.io.headers import combined_header

KINDS = ("uint16", "int16-blank", "float32", "int32", "fz")


def _write(path, data, kind, header=None):
    header = fits.Header() if header is None else header
    if kind == "uint16":
        fits.PrimaryHDU(data.astype(np.uint16), header=header).writeto(path)
    elif kind == "int16-blank":
        raw = data.astype(np.int16)
        raw[0, 0] = -32768
        header["BLANK"] = -32768
        hdu = fits.PrimaryHDU(raw, header=header)
        hdu.header["BLANK"] = -32768
        hdu.writeto(path)
    elif kind == "float32":
        fits.PrimaryHDU(data.astype(np.float32), header=header).writeto(path)
    elif kind == "int32":
        fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data.astype(np.int32), header=header)]).writeto(path)
    else:
        fits.HDUList([fits.PrimaryHDU(),
                      fits.CompImageHDU(data.astype(np.float32), header=header, tile_shape=(1, data.shape[1]),
                                        quantize_level=0.0, compression_type="GZIP_1")]).writeto(path)


@pytest.fixture(scope="module")
def frame_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("frames")
    rng = np.random.default_rng(7)
    files = {}
    for kind in KINDS:
        paths = []
        for i in range(7):
            data = rng.normal(1000 + 20 * i, 30, (37, 23))
            data[rng.random(data.shape) < 0.02] += 5000
            header = fits.Header()
            header["EXPTIME"] = 10.0 + i
            header["MJD-OBS"] = 60000.0 + i / 1440
            header["OBSERVER"] = "test"
            path = folder / f"{kind}_{i}.{'fits.fz' if kind == 'fz' else 'fits'}"
            _write(path, data, kind, header)
            paths.append(path)
        files[kind] = paths
    return files


def _in_memory(paths):
    from ccdcal.io.frames import read_image

    return [read_image(p)[0] for p in paths]


OPTIONS = dict(method="mean", scale="median", clip_extrema=(1, 1), sigma_clip=(2.5, 2.5))


def _equal(a, b):
    for name in ("data", "uncertainty", "nlow_rejected", "nhigh_rejected", "mask"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scale,region", [("median", None), ("mean", None), ("median", "[2:21,4:33]"),
                                          ("mean", "[1:23,2:2]")])
def test_files_stream_bit_identical_to_arrays(frame_files, kind, scale, region):
    # 16-bit files take the raw paths (levels from a histogram of the stored integers, tiles
    # decoded in the kernel): they must agree bit for bit with the decoded arrays
    paths = frame_files[kind]
    options = dict(OPTIONS, scale=scale, scale_region=region)
    streamed = combine(paths, memory=37 * 23 * 13 + 3 * 7 * 23 * 4 * 3, **options)  # ~3-row tiles
    in_memory = combine(_in_memory(paths), **options)
    _equal(streamed, in_memory)
    np.testing.assert_array_equal(streamed.scales, in_memory.scales)
    assert len(set(streamed.scales)) == 7  # the frames' levels differ
    assert streamed.header["NCOMBINE"] == 7


class RecordingRows:
    """A duck-typed row source that logs what is read."""

    def __init__(self, data, log):
        self.data = data
        self.shape = data.shape
        self.log = log

    def read_rows(self, y0, y1):
        self.log.append((y0, y1))
        return self.data[y0:y1].astype(np.float32)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 40), method=st.sampled_from(["median", "mean"]),
       reject=st.sampled_from(["sigma", "winsorized", "linear-fit"]))
def test_any_tile_size_gives_the_same_result(rows, method, reject):
    rng = np.random.default_rng(rows)
    stack = rng.normal(50, 5, (6, 40, 17)).astype(np.float32)
    stack[rng.random(stack.shape) < 0.05] = np.nan
    per_row = 6 * 17 * 4 + 17 * 4
    outputs = 40 * 17 * 11  # data, uncertainty (float32), nlow, nhigh (uint8 below 256 frames), mask
    logs = [[] for _ in range(6)]
    sources = [RecordingRows(stack[i], logs[i]) for i in range(6)]
    kw = dict(method=method, reject=reject, clip_extrema=(1, 0), scale="mean",
              scale_region="[3:12,5:30]")
    tiled = combine(sources, memory=outputs + 2 * rows * per_row, **kw)   # two tiles: one is read ahead
    whole = combine(list(stack), memory="1GiB", **kw)
    _equal(tiled, whole)
    for log in logs:
        region_read, tiles = log[0], log[1:]
        assert region_read == (4, 30)
        # tiles come in increasing order and cover every row exactly once
        assert [t[0] for t in tiles] == sorted(t[0] for t in tiles)
        assert sum(t[1] - t[0] for t in tiles) == 40 and tiles[-1][1] == 40
        assert all(t[1] - t[0] == min(rows, 40) for t in tiles[:-1])


def test_memory_bound_when_combining_more_than_the_budget(tmp_path):
    # 40 frames of 1024x1024 int16: 160 MiB as float32, five times the 32 MiB budget.
    rng = np.random.default_rng(1)
    base = rng.integers(900, 1100, (1024, 1024)).astype(np.int16)
    for i in range(40):
        fits.PrimaryHDU(base + np.int16(i)).writeto(tmp_path / f"b{i:02d}.fits")
    script = textwrap.dedent("""
        import json, resource, sys
        from pathlib import Path
        import numpy as np
        from ccdcal.combining.engine import combine
        from ccdcal.combining.options import parse_memory
        paths = sorted(Path(sys.argv[1]).glob("b*.fits"))
        combine([np.zeros((4, 4), np.float32)] * 3, clip_extrema=(1, 1), sigma_clip=(3, 3))  # JIT, imports
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result = combine(paths, method="median", clip_extrema=(1, 1), sigma_clip=(4, 3), memory="32MiB")
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({"growth": after - before, "budget": parse_memory("32MiB"),
                          "value": float(result.data[5, 5])}))
    """)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                         text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    # the result (13 MiB here) is inside the budget; 24 MiB of slack for allocator and page noise
    assert report["growth"] < report["budget"] + 24 * 2**20, report
    assert report["value"] == pytest.approx(float(base[5, 5]) + 19.5)


def test_header_provenance_and_times(frame_files):
    paths = frame_files["uint16"]
    mean = combine(paths, method="mean", scale="median")
    h = mean.header
    assert h["NCOMBINE"] == 7 and h["OBSERVER"] == "test"
    assert h["IMCMB001"] == "uint16_0.fits" and h["IMCMB007"] == "uint16_6.fits"
    assert h["SCAL0001"] == pytest.approx(mean.scales[0])
    assert h["EXPTIME"] == pytest.approx(13.0)
    assert h["MJD-OBS"] == pytest.approx(60000.0 + 3 / 1440)
    assert h["MJD-AVG"] == pytest.approx(60000.0 + 3 / 1440 + 13.0 / 86400 / 2)
    assert "BZERO" not in h and "BITPIX" not in h
    total = combine(paths, method="sum")
    assert total.header["EXPTIME"] == pytest.approx(91.0)
    assert total.header["MJD-OBS"] == pytest.approx(60000.0)
    assert total.header["MJD-END"] == pytest.approx(60000.0 + 6 / 1440 + 16.0 / 86400)


def test_combined_header_without_times():
    h = combined_header([fits.Header({"EXPTIME": 3.0}), None], method="median",
                        scales=np.ones(2), frames=[np.zeros(1), np.zeros(1)])
    assert h["NCOMBINE"] == 2 and "EXPTIME" not in h and "MJD-OBS" not in h


@pytest.mark.parametrize("kw, message", [
    ({"method": "mode"}, "method"),
    ({"memory": "lots"}, "memory budget"),
    ({"weights": [1, 2, 3], "method": "median"}, "weights"),
    ({"reject": "ccdclip"}, "gain"),
    ({"sigma_clip": (3, 3), "reject": "none"}, "reject='none'"),
    ({"clip_extrema": (1,)}, "clip_extrema"),
    ({"scale": [1.0, 2.0]}, "scale has 2 values for 3 frames"),
    ({"compat": "ccdproc", "maxiters": 3}, "single pass"),
    ({"scale_region": "[1:50,1:2]", "scale": "median"}, "outside"),
])
def test_bad_options_are_one_line_input_errors(kw, message):
    frames = [np.ones((4, 5), np.float32)] * 3
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace("[", r"\[")):
        combine(frames, **kw)


def test_frames_of_different_sizes_are_refused():
    with pytest.raises(InputError, match="one size"):
        combine([np.zeros((4, 4)), np.zeros((4, 5))])


def test_parse_memory():
    assert parse_memory("256MiB") == 256 * 2**20
    assert parse_memory("1.5GB") == 1_500_000_000
    assert parse_memory(1000) == 1000
    with pytest.raises(InputError):
        parse_memory("-1GiB")


def test_cli_combine_writes_a_readable_master(frame_files, tmp_path, capsys):
    from astropy.nddata import CCDData

    out = tmp_path / "master.fits"
    paths = [str(p) for p in frame_files["uint16"]]
    code = main(["combine", *paths, "-o", str(out), "--method", "median", "--clip-extrema", "1,1",
                 "--sigma-clip", "4,3", "--scale", "median", "--scale-region", "[2:20,3:30]",
                 "--memory", "256MiB"])
    assert code == 0
    master = CCDData.read(out, unit="adu")
    expected = combine(paths, method="median", clip_extrema=(1, 1), sigma_clip=(4, 3),
                       scale="median", scale_region="[2:20,3:30]")
    np.testing.assert_array_equal(master.data, expected.data)
    assert master.header["NCOMBINE"] == 7
    assert "7 frames" in capsys.readouterr().out


def test_cli_combine_bad_input_exits_2(tmp_path, capsys):
    (tmp_path / "a.fits").write_bytes(b"not fits")
    code = main(["combine", str(tmp_path / "a.fits"), "-o", str(tmp_path / "out.fits")])
    assert code == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_compat_cli_flag(frame_files, tmp_path):
    out = tmp_path / "compat.fits"
    paths = [str(p) for p in frame_files["float32"]]
    assert main(["combine", *paths, "-o", str(out), "--method", "mean", "--sigma-clip", "2,2",
                 "--compat", "ccdproc"]) == 0
    expected = combine(paths, method="mean", sigma_clip=(2, 2), compat="ccdproc")
    np.testing.assert_array_equal(fits.getdata(out), expected.data)


def test_gzipped_frames_stream_like_their_uncompressed_twins(frame_files, tmp_path):
    # .gz files are decompressed once into an anonymous temporary file and streamed by rows
    # like plain files (raw 16-bit tiles, histogram levels): the same result, bit for bit
    import gzip
    import shutil

    gz = []
    for path in frame_files["uint16"]:
        target = tmp_path / (path.name + ".gz")
        with open(path, "rb") as src, gzip.open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
        gz.append(target)
    plain = combine(frame_files["uint16"], **OPTIONS)
    zipped = combine(gz, memory=37 * 23 * 11 + 3 * 7 * 23 * 2, **OPTIONS)  # a few rows per tile
    _equal(zipped, plain)
    np.testing.assert_array_equal(zipped.scales, plain.scales)


def test_truncated_gzip_is_a_one_line_input_error(frame_files, tmp_path):
    import gzip

    path = frame_files["uint16"][0]
    payload = gzip.compress(path.read_bytes())
    broken = tmp_path / "cut.fits.gz"
    broken.write_bytes(payload[: len(payload) * 2 // 3])
    with pytest.raises(InputError, match="cut.fits.gz") as info:
        combine([broken] + frame_files["uint16"][1:], **OPTIONS)
    assert "\n" not in str(info.value)


# -- the pieces of combine: options, factors once, any band of rows -------------------------------
def _bands(ny, rng):
    cuts = sorted(set(rng.choice(np.arange(1, ny), size=min(4, ny - 1), replace=False).tolist()))
    edges = [0, *cuts, ny]
    bands = list(zip(edges[:-1], edges[1:], strict=True))
    rng.shuffle(bands)  # any order: each band stands alone
    return bands


def _masked_ccds(seed, n=6, shape=(29, 83)):
    from astropy.nddata import CCDData, StdDevUncertainty

    rng = np.random.default_rng(seed)
    stack = rng.normal(1000, 25, (n, *shape)).astype(np.float32)
    stack[rng.random(stack.shape) < 0.03] += 3000
    stack[rng.random(stack.shape) < 0.02] = np.nan
    masks = rng.random(stack.shape) < 0.1
    return [CCDData(stack[i] * (1 + 0.05 * i), unit="adu", mask=masks[i],
                    uncertainty=StdDevUncertainty(np.full(shape, 25.0, np.float32)),
                    header=fits.Header({"EGAIN": 2.0, "RDNOISE": 8.0})) for i in range(n)]


PIECES = {
    "16-bit files, scaled, extrema and sigma (raw tiles, histogram levels)":
        ("uint16", dict(method="median", scale="median", scale_region="[2:21,4:33]", clip_extrema=(1, 1),
                        sigma_clip=(2.5, 2.5))),
    "float files, scale and zero, winsorized": ("float32", dict(method="mean", scale="mean", zero="median",
                                                                reject="winsorized")),
    "masked CCDData with uncertainties, ccdclip, scaled": ("ccd", dict(method="mean", scale="median",
                                                                       reject="ccdclip", pedestal=900.0)),
    "masked CCDData, given weights, mad": ("ccd", dict(method="sum", weights=[1, 2, 3, 1, 2, 3], reject="mad",
                                                       clip_extrema=(0, 1))),
    "compat ccdproc with masks": ("ccd", dict(method="mean", clip_extrema=(1, 1), sigma_clip=(2, 2),
                                              scale=[1, 1.1, 0.9, 1, 1.05, 0.95], compat="ccdproc")),
}


@pytest.mark.parametrize("case", sorted(PIECES))
def test_factors_once_then_any_band_of_rows_is_bit_identical_to_combine(frame_files, case):
    import pickle

    from ccdcal.combining.engine import combine_rows, measure_factors
    from ccdcal.combining.options import CombineOptions

    kind, kw = PIECES[case]
    frames = _masked_ccds(3) if kind == "ccd" else frame_files[kind]
    whole = combine(frames, **kw)
    header = frames[0].header if kind == "ccd" else None
    options = CombineOptions.create(len(frames), header=header, **kw)
    factors = measure_factors(frames, options)
    # what a worker process receives
    options, factors = pickle.loads(pickle.dumps((options, factors)))
    np.testing.assert_array_equal(factors.scales, whole.scales)
    np.testing.assert_array_equal(factors.zeros, whole.zeros)
    ny = whole.data.shape[0]
    planes = {name: np.zeros_like(getattr(whole, name))
              for name in ("data", "uncertainty", "nlow_rejected", "nhigh_rejected", "mask")}
    members = None
    for y0, y1 in _bands(ny, np.random.default_rng(len(case))):
        tile = combine_rows(frames, factors, options, y0, y1, memory=200_000)  # a few tiles per band
        assert (tile.y0, tile.y1) == (y0, y1)
        for name, plane in planes.items():
            assert getattr(tile, name).dtype == plane.dtype
            plane[y0:y1] = getattr(tile, name)
        if tile.member_rejected is not None:
            members = tile.member_rejected if members is None else members + tile.member_rejected
    for name, plane in planes.items():
        np.testing.assert_array_equal(plane, getattr(whole, name), err_msg=name)
    if whole.member_rejected is None:
        assert members is None
    else:
        np.testing.assert_array_equal(members, whole.member_rejected)


@pytest.mark.parametrize("kw", [
    {},
    dict(method="mean", scale="median", scale_region="[2:21,4:33]", clip_extrema=(1, 1), sigma_clip=(2.5, 2)),
    dict(method="sum", scale=np.array([1.0, 2.0, 0.5]), zero=[1, 2, 3], weights=(1, 1, 2), reject="percentile"),
    dict(method="mean", reject="ccdclip", gain=1.5, read_noise=4, sensitivity_noise=0.01, pedestal=np.inf),
    dict(method="mean", sigma_clip=(3, 3), reject="mad", clip_extrema=(0, 1), compat="ccdproc"),
    dict(method="median", reject="linear-fit", center="mean", maxiters=np.int64(2)),
])
def test_combine_options_pickle_and_compare_equal(kw):
    import dataclasses
    import pickle

    from ccdcal.combining.options import CombineOptions

    options = CombineOptions.create(3, **kw)
    again = pickle.loads(pickle.dumps(options))
    assert again == options and hash(again) == hash(options)
    assert CombineOptions(**dataclasses.asdict(options)) == options  # the fields are the resolved choices
    for mine, theirs in zip(options.kernel_params(), again.kernel_params(), strict=True):
        np.testing.assert_array_equal(mine, theirs)


def test_combine_options_resolve_the_defaults():
    from ccdcal.combining.options import CombineOptions

    options = CombineOptions(sigma_clip=(4, 3))
    assert (options.reject, options.center, options.sigma_clip, options.maxiters) == ("sigma", "median", (4.0, 3.0), None)
    assert CombineOptions(reject="percentile").sigma_clip == (0.2, 0.1)
    compat = CombineOptions(method="mean", compat="ccdproc")
    assert (compat.center, compat.maxiters, compat.reject, compat.sigma_clip) == ("mean", 1, "none", None)
    header = fits.Header({"EGAIN": 1.25, "RON": 6.5})
    ccdclip = CombineOptions.create(4, header=header, reject="ccdclip")
    assert (ccdclip.gain, ccdclip.read_noise) == (1.25, 6.5)
    assert CombineOptions(gain=2.0).gain is None  # only ccdclip uses a gain
    assert CombineOptions(scale="none").scale is None


@pytest.mark.parametrize("kw", [
    {"method": "mode"},
    {"weights": [1, 2, 3], "method": "median"},
    {"reject": "ccdclip"},
    {"reject": "ccdclip", "gain": 2.0},
    {"sigma_clip": (3, 3), "reject": "none"},
    {"sigma_clip": (3, -1)},
    {"clip_extrema": (1,)},
    {"clip_extrema": (1, -1)},
    {"center": "mode"},
    {"maxiters": 0},
    {"pedestal": float("nan")},
    {"sensitivity_noise": -0.1},
    {"scale": "mode"},
    {"zero": "mode"},
    {"scale": [1.0, 2.0]},
    {"scale": [1.0, 0.0, 2.0]},
    {"zero": [0.0, np.nan, 1.0]},
    {"weights": [1.0, 1.0, -1.0], "method": "mean"},
    {"compat": "astropy"},
    {"compat": "ccdproc", "maxiters": 3},
    {"compat": "ccdproc", "reject": "winsorized"},
    {"compat": "ccdproc", "zero": "median"},
])
def test_combine_options_refuse_what_combine_refuses_in_the_same_words(kw):
    from ccdcal.combining.options import CombineOptions

    frames = [np.ones((4, 5), np.float32)] * 3
    with pytest.raises(InputError) as from_combine:
        combine(frames, **kw)
    with pytest.raises(InputError) as from_options:
        CombineOptions.create(3, **kw)
    assert str(from_options.value) == str(from_combine.value)
    assert "\n" not in str(from_options.value)


class MaskedRows:
    """A row source that serves its own mask (the RowSourceWithPlanes protocol)."""

    def __init__(self, data, mask):
        self.data, self.mask, self.shape = data, mask, data.shape

    def read_rows(self, y0, y1):
        return self.data[y0:y1].astype(np.float32)

    def read_mask_rows(self, y0, y1):
        return self.mask[y0:y1]


def test_a_row_source_mask_counts_like_a_masked_array():
    rng = np.random.default_rng(11)
    stack = rng.normal(100, 3, (5, 12, 70)).astype(np.float32)
    masks = rng.random(stack.shape) < 0.2
    kw = dict(method="mean", clip_extrema=(1, 0), reject="mad")
    sources = combine([MaskedRows(stack[i], masks[i]) for i in range(5)], **kw)
    arrays = combine([np.ma.MaskedArray(stack[i], mask=masks[i]) for i in range(5)], **kw)
    _equal(sources, arrays)
    unmasked = combine(list(stack), **kw)
    assert not np.array_equal(sources.data, unmasked.data)


def test_combine_rows_refuses_a_band_outside_the_frames():
    from ccdcal.combining.engine import combine_rows, measure_factors
    from ccdcal.combining.options import CombineOptions

    frames = [np.ones((4, 5), np.float32)] * 3
    options = CombineOptions()
    factors = measure_factors(frames, options)
    for y0, y1 in ((0, 5), (2, 2), (-1, 3)):
        with pytest.raises(InputError, match="not a band"):
            combine_rows(frames, factors, options, y0, y1)
    with pytest.raises(InputError, match="factors are for 3 frames"):
        combine_rows(frames[:2], factors, options, 0, 4)


class SlowCheckedRows:
    """A row source that fails the test when two threads read frames at once, or when a
    frame's bands do not come in increasing order; it sleeps a little in each read so that
    an overlap, were there one, would happen."""

    def __init__(self, data, state, fail_at=None):
        self.data, self.shape, self.state, self.fail_at = data, data.shape, state, fail_at
        self.last = 0

    def read_rows(self, y0, y1):
        import threading
        import time

        assert self.state["lock"].acquire(blocking=False), "two reads at once"
        try:
            assert y0 == self.last, f"band {y0}:{y1} after {self.last}"
            self.last = y1
            self.state["threads"].add(threading.get_ident())
            if self.fail_at is not None and y0 <= self.fail_at < y1:
                raise OSError("the disk went away")
            time.sleep(0.002)
            return self.data[y0:y1].astype(np.float32)
        finally:
            self.state["lock"].release()


#: a budget that holds the (64, 33) result of 5 frames and two 3-row tiles only: many tiles
_SMALL_TILES = 64 * 33 * 13 + 2 * 3 * (5 * 33 * 4 + 33 * 4)


def _combined_in_small_tiles(seed):
    """The mean of 5 random frames read by SlowCheckedRows in small tiles, checked against
    numpy's; returns (frames, what the sources saw)."""
    import threading

    stack = np.random.default_rng(seed).normal(100, 5, (5, 64, 33)).astype(np.float32)
    state = {"lock": threading.Lock(), "threads": set()}
    result = combine([SlowCheckedRows(f, state) for f in stack], method="mean", reject="none",
                     memory=_SMALL_TILES)
    assert np.array_equal(result.data, np.mean(stack, axis=0, dtype=np.float64).astype(np.float32))
    return stack, state


def test_the_next_tile_is_read_by_one_thread_in_order_while_the_kernel_runs():
    """Tiles are read ahead in a thread: the result equals numpy's; the frames are read one
    at a time and in order; a read error reaches the caller and leaves no reader running."""
    import threading

    stack, state = _combined_in_small_tiles(4)
    assert state["threads"] and threading.get_ident() not in state["threads"]
    before = threading.active_count()
    sources = [SlowCheckedRows(f, state, fail_at=40 if i == 2 else None) for i, f in enumerate(stack)]
    with pytest.raises(OSError, match="disk went away"):
        combine(sources, method="mean", reject="none", memory=_SMALL_TILES)
    assert threading.active_count() == before


def test_on_a_layer_that_is_not_threadsafe_the_caller_reads_every_tile(monkeypatch):
    """numba's workqueue layer aborts when two threads run kernels at once, and reading a
    calibrated tile may run one: there the tiles are read by the caller, the same result."""
    import importlib
    import threading

    monkeypatch.setattr(importlib.import_module("ccdcal._shared.pool"), "kernels_threadsafe", lambda: False)
    _, state = _combined_in_small_tiles(5)
    assert state["threads"] == {threading.get_ident()}
