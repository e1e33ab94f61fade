"""Hostile and careless inputs (issue 25): outputs that resolve to inputs, header values that
make one name, two runs on one folder, a bad card, a compressed bomb, a BITPIX astropy opens.

Every case asserts what a user relies on: the exit code and a one-line message, raws
byte-identical, nothing written outside OUT, every output in the manifest, ``verify`` clean.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ccdcal._shared.names import NameBook, printable, safe_part, unique_stem
from ccdcal.errors import CcdcalWarning, InputError
from ccdcal.io.guard import LOCK_NAME, output_lock, reduce_inputs, refuse_overwrite

AUX = {"manifest.json", "report.html", LOCK_NAME}


def ccdcal(*args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ccdcal.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (links not followed) and the SHA-256 of its bytes."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def one_line_error(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr
    return errors[0]


def assert_clean_output(out: Path) -> None:
    """Every FITS file under OUT is in the manifest, ``verify`` passes, nothing half-written."""
    manifest = json.loads((out / "manifest.json").read_text())
    listed = set(manifest["outputs"])
    for p in out.rglob("*"):
        rel = p.relative_to(out).as_posix()
        assert not p.name.endswith(".partial"), rel
        if p.is_file() and p.parent.name != "previews" and rel not in AUX:
            assert rel in listed, f"{rel} written but not in the manifest"
    from ccdcal.pipeline.run import verify

    result = verify(out)
    assert not result.problems and not result.unlisted, (result.problems, result.unlisted)


@pytest.fixture(scope="module")
def small_night(tmp_path_factory) -> Path:
    """A small raw night: 3 biases, darks of 60 s and 300 s, 3 flats and 2 lights in R and V."""
    from ccdcal.demo import write_night

    root = tmp_path_factory.mktemp("hostile")
    return write_night(root / "raw", size=48, seed=11, n_bias=3, n_dark=3, n_flat=3, n_light=2)


def fresh(small_night: Path, target: Path) -> Path:
    shutil.copytree(small_night, target)
    return target


def set_card(path: Path, key: str, value: bytes) -> None:
    """Write ``KEY = 'value'`` into the raw header bytes of ``path`` (any bytes: astropy would
    refuse to write control characters or non-ASCII, real capture programs do not)."""
    data = bytearray(path.read_bytes())
    for i in range(0, 2880 * 4, 80):
        if data[i:i + 8].decode("ascii", "replace").strip() == key:
            data[i:i + 80] = (f"{key:<8}= '".encode() + value.replace(b"'", b"''")[:66] + b"'").ljust(80)[:80]
            path.write_bytes(bytes(data))
            return
    raise AssertionError(f"{key} not in {path}")


# -- names -------------------------------------------------------------------------------------
@given(st.lists(st.text(min_size=0, max_size=400), min_size=2, max_size=6, unique=True))
@settings(max_examples=200, deadline=None)
def test_unique_stem_never_gives_two_texts_one_name(texts):
    stems = [unique_stem(t) for t in texts]
    assert len({s.casefold() for s in stems}) == len(texts) or len({t.casefold() for t in texts}) < len(texts)
    for s in stems:
        assert 0 < len(s) <= 64 and "/" not in s and "\x00" not in s and s not in (".", "..")


@given(st.lists(st.text(max_size=400), min_size=1, max_size=8))
@settings(max_examples=200, deadline=None)
def test_namebook_gives_each_group_its_own_name(values):
    book = NameBook()
    names = {v: book.claim(f"masters/master_flat_{safe_part(v)}.fits", v) for v in values}
    assert len({n.casefold() for n in names.values()}) == len(set(values))
    assert all(len(Path(n).name.encode()) <= 255 for n in names.values())
    # asking again for the same group gives the same name
    assert all(book.claim(f"masters/master_flat_{safe_part(v)}.fits", v) == names[v] for v in values)


def test_printable_escapes_what_a_terminal_would_obey():
    assert printable("a\x1b]0;pwned\x07b") == "a\\x1b]0;pwned\\x07b"
    assert printable("ok name é [bold]") == "ok name é [bold]"
    assert "\u202e" not in printable("x\u202efits.exe")


HEADER_TEXT = st.one_of(
    st.text(max_size=400),
    st.binary(max_size=66).map(lambda b: b.decode("latin-1")),
    st.sampled_from(["a/b", "a b", "a_b", "A B", "a:b", "", " ", "..", "/", "R" * 300, "nofilter"]),
)


@given(st.lists(HEADER_TEXT, min_size=2, max_size=5))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_plan_never_maps_two_groups_to_one_path(values):
    """Flats and lights in as many filters (and objects) as values: every output path of the
    plan is distinct, and each light is flat-fielded by the flat of its own filter."""
    from ccdcal.planning.inventory import FrameInfo, FrameKind, Inventory
    from ccdcal.planning.plan import PlanOptions, build_plan

    frames = []
    for i, value in enumerate(values):
        for kind, n in ((FrameKind.FLAT, 2), (FrameKind.LIGHT, 2)):
            for k in range(n):
                frames.append(FrameInfo(path=Path(f"/raw/{kind.value}_{i}_{k}.fits"), hdu=0, kind=kind,
                                        exptime=10.0, filter=value, binning=(1, 1), shape=(32, 32),
                                        ccd_temp=-10.0, object=value))
    for k in range(3):
        frames.append(FrameInfo(path=Path(f"/raw/bias_{k}.fits"), hdu=0, kind=FrameKind.BIAS, exptime=0.0,
                                filter=None, binning=(1, 1), shape=(32, 32), ccd_temp=-10.0))
    plan = build_plan(Inventory(tuple(frames)), PlanOptions(stack=True))
    outputs = [j.output for j in plan.masters] + [j.output for j in plan.lights] + [s.output for s in plan.stacks]
    assert len({o.casefold() for o in outputs}) == len(outputs)
    flat_of = {j.filter: j.name for j in plan.masters if j.kind == FrameKind.FLAT}
    assert len(set(flat_of.values())) == len(flat_of) == len(set(values))
    for job in plan.lights:
        assert job.recipe.flat == flat_of[job.frame.filter]
    for out in outputs:
        assert all(0 < len(part.encode()) <= 255 for part in out.split("/"))


@given(st.lists(st.binary(min_size=1, max_size=66), min_size=2, max_size=2, unique=True))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
def test_any_filter_bytes_reduce_into_their_own_masters(small_night, tmp_path_factory, values):
    """FILTER and OBJECT cards holding any bytes (NUL, escapes, UTF-8, quotes): the night is
    reduced, raws unchanged, each filter its own master flat, every output listed, verify clean."""
    from ccdcal.pipeline.run import ReduceOptions, reduce

    root = fresh(small_night, tmp_path_factory.mktemp("bytes") / "raw")
    for band, value in zip("RV", values, strict=True):
        for path in root.glob(f"*_{band}_*.fits"):
            set_card(path, "FILTER", value)
            if path.name.startswith("m51"):
                set_card(path, "OBJECT", value[::-1])
    before = tree_digest(root)
    out = root.parent / "out"
    result = reduce(root, out, options=ReduceOptions(report=False, stack=True))
    assert tree_digest(root) == before
    assert sorted(p.name for p in root.parent.iterdir()) == ["out", "raw"]    # nothing outside OUT
    flats = {j.filter: j.output for j in result.plan.masters if j.kind.value == "flat"}
    lights = {j.frame.filter for j in result.plan.lights}
    # two different card values may clean to one value (both to '?'): then they are one filter
    assert len(set(flats.values())) == len(flats) == len(lights)
    assert len(result.lights) == 4
    assert_clean_output(out)


def test_two_filters_that_slug_alike_get_their_own_flats_end_to_end(small_night, tmp_path):
    """FILTER 'a/b' and 'a b' (issue 25 #2): two master flats, each light divided by its own,
    checked against the flats' own files with plain numpy."""
    raw = fresh(small_night, tmp_path / "raw")
    for band, value in (("R", "a/b"), ("V", "a b")):
        for path in raw.glob(f"*_{band}_*.fits"):
            with fits.open(path, mode="update") as hdul:
                hdul[0].header["FILTER"] = value
    result = ccdcal("reduce", raw, "-o", tmp_path / "out", "--no-report")
    assert result.returncode == 0, result.stderr
    assert "would have the name" in result.stderr          # the plan says it disambiguated
    masters = sorted(p.name for p in (tmp_path / "out" / "masters").glob("master_flat_*"))
    assert len(masters) == 2
    for band, value in (("R", "a/b"), ("V", "a b")):
        cal = tmp_path / "out" / "calibrated" / f"m51_{band}_001.fits"
        used = [h for h in fits.getheader(cal)["HISTORY"] if "master flat" in h][0].split()[4]
        assert fits.getheader(tmp_path / "out" / "masters" / used)["FILTER"] == value
    assert_clean_output(tmp_path / "out")


def test_long_object_and_filter_make_bounded_names(small_night, tmp_path):
    raw = fresh(small_night, tmp_path / "raw")
    for path in raw.glob("*_R_*.fits"):
        with fits.open(path, mode="update") as hdul:
            hdul[0].header["FILTER"] = "R" * 300
            hdul[0].header["OBJECT"] = "M" * 300
    result = ccdcal("reduce", raw, "-o", tmp_path / "out")
    assert result.returncode in (0, 3), result.stderr
    assert "Traceback" not in result.stderr
    out = tmp_path / "out"
    assert len(list((out / "calibrated").glob("*.fits"))) == 4
    assert (out / "report.html").exists()
    assert all(len(p.name) <= 255 for p in out.rglob("*"))
    assert_clean_output(out)


def test_raw_names_that_slug_alike_get_their_own_previews(small_night, tmp_path):
    raw = fresh(small_night, tmp_path / "raw")
    (raw / "m51_R_001.fits").rename(raw / "a b.fits")
    (raw / "m51_R_002.fits").rename(raw / "a_b.fits")
    from ccdcal.pipeline.run import ReduceOptions, reduce

    reduce(raw, tmp_path / "out", options=ReduceOptions())
    report = (tmp_path / "out" / "report.html").read_text()
    from ccdcal.report.page import light_facts

    previews = {p.name for p in (tmp_path / "out" / "previews").glob("light-*.png")}
    assert len(previews) == 4
    stored = [light_facts(tmp_path / "out" / "previews" / n)["output"] for n in previews]
    assert sorted(stored) == sorted(f"calibrated/{n}.fits" for n in ("a b", "a_b", "m51_V_001", "m51_V_002"))
    assert report.count("a_b~") >= 1


# -- outputs that resolve to inputs --------------------------------------------------------------
def test_output_folder_linked_to_raw_is_refused_before_any_work(small_night, tmp_path):
    raw = fresh(small_night, tmp_path / "raw")
    before = tree_digest(raw)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "calibrated").symlink_to(raw.resolve())
    result = ccdcal("reduce", raw, "-o", tmp_path / "out")
    assert result.returncode == 2
    assert "calibrated" in one_line_error(result)
    assert tree_digest(raw) == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["calibrated"]   # nothing written


@pytest.mark.parametrize("case", ["reduce-into-raw", "reduce-into-parent-link", "calibrate-into-raw",
                                  "combine-over-input", "combine-over-link", "stack-over-input"])
def test_every_command_refuses_to_write_over_an_input(small_night, tmp_path, case):
    raw = fresh(small_night, tmp_path / "raw")
    before = tree_digest(raw)
    biases = sorted(raw.glob("bias_*.fits"))
    if case == "reduce-into-raw":
        args = ["reduce", raw, "-o", raw]
        expect = "is the input folder"
    elif case == "reduce-into-parent-link":
        (tmp_path / "alias").symlink_to(raw.resolve())
        args = ["reduce", raw / "m51_R_001.fits", raw / "bias_001.fits", "-o", tmp_path / "alias"]
        expect = "holds the input"
    elif case == "calibrate-into-raw":
        args = ["calibrate", raw / "m51_R_001.fits", "-o", raw, "--bias", biases[0], "--allow-uncorrected"]
        expect = "holds the input"
    elif case == "combine-over-input":
        args = ["combine", *biases, "-o", biases[0]]
        expect = "is the input"
    elif case == "combine-over-link":
        (tmp_path / "link.fits").symlink_to(biases[1].resolve())
        args = ["combine", *biases, "-o", tmp_path / "link.fits"]
        expect = "leads to the input"
    else:
        args = ["stack", raw / "m51_R_001.fits", raw / "m51_R_002.fits", "-o", raw / "m51_R_002.fits"]
        expect = "is the input"
    result = ccdcal(*args)
    assert result.returncode == 2, result.stderr
    assert expect in one_line_error(result)
    assert tree_digest(raw) == before
    assert not list(raw.rglob("*.partial"))


def test_refuse_overwrite_sees_hard_links(tmp_path):
    src = tmp_path / "a.fits"
    src.write_bytes(b"x" * 2880)
    os.link(src, tmp_path / "b.fits")
    with pytest.raises(InputError, match="leads to the input"):
        refuse_overwrite([src], files=[tmp_path / "b.fits"])
    refuse_overwrite([src], files=[tmp_path / "c.fits"])     # a new name is fine


def test_reduce_into_a_parent_of_raw_is_allowed_and_scans_raw(small_night, tmp_path):
    """OUT=night with raws in night/raw: the raws are read (only OUT's own output folders are
    left out of the scan), nothing in raw is written."""
    raw = fresh(small_night, tmp_path / "raw")
    before = tree_digest(raw)
    kept = reduce_inputs(sorted(raw.glob("*.fits")), tmp_path, input_folders=[raw])
    assert len(kept) == len(before)
    result = ccdcal("reduce", raw, "-o", tmp_path, "--no-report")
    assert result.returncode == 0, result.stderr
    assert tree_digest(raw) == before
    rerun = ccdcal("reduce", raw, "-o", tmp_path, "--no-report")   # its outputs are not inputs
    assert rerun.returncode == 0, rerun.stderr
    assert "up to date" in rerun.stdout


def test_broken_links_and_loops_are_named(small_night, tmp_path):
    raw = fresh(small_night, tmp_path / "raw")
    (raw / "gone.fits").symlink_to(tmp_path / "unmounted" / "x.fits")
    (raw / "loop.fits").symlink_to("loop.fits")
    (raw / "sub").mkdir()
    (raw / "sub" / "up").symlink_to("..")
    result = ccdcal("reduce", raw, "-o", tmp_path / "out", "--no-report")
    assert result.returncode == 3, result.stderr                      # finished, inputs skipped
    assert "gone.fits: a link to" in result.stdout and "does not exist" in result.stdout
    assert "loop.fits: a link that loops" in result.stdout
    assert "already searched" in result.stdout
    assert len(list((tmp_path / "out" / "calibrated").glob("*.fits"))) == 4


def test_verify_names_fits_files_the_manifest_does_not_list(demo_night, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(demo_night / "out", out)
    shutil.copy(next((out / "calibrated").glob("*.fits")), out / "calibrated" / "stray.fits")
    result = ccdcal("verify", out)
    assert result.returncode == 0
    assert "calibrated/stray.fits: a FITS file the manifest does not list" in result.stderr


# -- one run per output folder -------------------------------------------------------------------
def test_lock_refuses_a_second_holder_and_is_dropped_on_sigkill(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from ccdcal.io.guard import output_lock\n"
        f"with output_lock({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(InputError, match=f"in use by pid {holder.pid}"):
            with output_lock(tmp_path):
                pass
        with pytest.raises(InputError, match="in use"):
            with output_lock(tmp_path, shared=True):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with output_lock(tmp_path):       # the OS dropped the dead process's lock
        assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
    with output_lock(tmp_path, shared=True), output_lock(tmp_path, shared=True):
        pass                          # readers share it


def test_two_runs_started_at_once_one_waits_out(small_night, tmp_path):
    raw = fresh(small_night, tmp_path / "raw")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ccdcal.cli", "reduce", str(raw), "-o", str(out), "--no-report"]
    runs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in runs]
    codes = sorted(code for code, _ in results)
    assert codes in ([0, 0], [0, 2]), results           # a second run that started after the first ended is fine
    for code, err in results:
        if code == 2:
            assert "in use by pid" in err and "Traceback" not in err
    assert_clean_output(out)


def test_a_run_killed_while_holding_the_lock_leaves_no_stale_lock(small_night, tmp_path):
    raw = fresh(small_night, tmp_path / "raw")
    out = tmp_path / "out"
    run = subprocess.Popen([sys.executable, "-m", "ccdcal.cli", "reduce", str(raw), "-o", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out / LOCK_NAME).exists():
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.wait()
    result = ccdcal("reduce", raw, "-o", out, "--no-report")
    assert result.returncode == 0, result.stderr
    assert_clean_output(out)


# -- one bad file never loses the night ----------------------------------------------------------
def _gzip_bomb(path: Path) -> None:
    header = fits.Header([("SIMPLE", True), ("BITPIX", 16), ("NAXIS", 2), ("NAXIS1", 200000),
                          ("NAXIS2", 200000), ("IMAGETYP", "LIGHT"), ("FILTER", "R"), ("EXPTIME", 60.0)])
    with gzip.open(path, "wb") as fh:
        fh.write(header.tostring().encode() + bytes(2880 * 50))


def _fz_bomb(path: Path) -> None:
    hdu = fits.CompImageHDU(np.zeros((64, 96), dtype=np.int16))
    hdu.header["IMAGETYP"] = "LIGHT"
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(path)
    data = bytearray(path.read_bytes())
    for key in (b"ZNAXIS1 =", b"ZNAXIS2 ="):
        i = data.find(key)
        data[i:i + 80] = (key + b"               200000").ljust(80)
    path.write_bytes(bytes(data))


def _bad_bitpix(path: Path, source: Path) -> None:
    data = bytearray(source.read_bytes())
    i = data.find(b"BITPIX  =")
    data[i:i + 80] = b"BITPIX  =                   17".ljust(80)
    path.write_bytes(bytes(data))


def _truncated_gz(path: Path, source: Path) -> None:
    packed = gzip.compress(source.read_bytes())
    path.write_bytes(packed[: len(packed) // 2])


@pytest.mark.parametrize("case", ["gz-bomb", "fz-bomb", "bitpix-17", "truncated-gz", "nul-in-object",
                                  "unparsable-card"])
def test_one_bad_file_is_skipped_and_the_night_goes_on(small_night, tmp_path, case):
    raw = fresh(small_night, tmp_path / "raw")
    light = raw / "m51_R_002.fits"
    bad = {"gz-bomb": raw / "bomb.fits.gz", "fz-bomb": raw / "bomb.fits.fz", "bitpix-17": raw / "x.fits",
           "truncated-gz": raw / "cut.fits.gz"}.get(case)
    if case == "gz-bomb":
        _gzip_bomb(bad)
    elif case == "fz-bomb":
        _fz_bomb(bad)
    elif case == "bitpix-17":
        _bad_bitpix(bad, light)
    elif case == "truncated-gz":
        _truncated_gz(bad, light)
    elif case == "nul-in-object":
        set_card(light, "OBJECT", b"m5\x001\x1b[2J\x07")
        set_card(light, "FILTER", b"R\x07")
    else:
        data = bytearray(light.read_bytes())
        i = data.find(b"OBJECT  =")
        data[i:i + 80] = b"OBJECT  = 'unterminated \x00".ljust(80)
        light.write_bytes(bytes(data))
    before = tree_digest(raw)
    result = ccdcal("reduce", raw, "-o", tmp_path / "out", "--no-report")
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr
    assert "\x1b" not in result.stdout + result.stderr and "\x07" not in result.stdout + result.stderr
    assert tree_digest(raw) == before
    calibrated = {p.name for p in (tmp_path / "out" / "calibrated").glob("*.fits")}
    assert {"m51_R_001.fits", "m51_V_001.fits", "m51_V_002.fits"} <= calibrated
    if bad is not None:
        assert result.returncode == 3 and f"skipped {bad}" in result.stdout, result.stdout
    else:
        assert result.returncode == 0, result.stderr
        assert "m51_R_002.fits" in calibrated
        assert "OBJECT" in result.stderr and ("read as" in result.stderr or "ignored" in result.stderr)
    assert_clean_output(tmp_path / "out")
    for command in (["scan", raw], ["stats", raw]):
        other = ccdcal(*command)
        assert other.returncode == (3 if bad is not None and command[0] == "stats" else 0), other.stderr
        assert "Traceback" not in other.stderr and "m51_V_002.fits" in other.stdout


def test_full_temporary_folder_blames_the_folder_not_the_raw(tmp_path, monkeypatch):
    """A .gz decompressed into a temporary folder that fills up: the error says so, and is
    an output problem (exit 1), not 'copy the file again'."""
    import errno
    import tempfile

    from ccdcal.errors import OutputError
    from ccdcal.io.frames import FrameSource

    path = tmp_path / "x.fits.gz"
    hdu = fits.PrimaryHDU(np.arange(64 * 64, dtype=np.int16).reshape(64, 64))
    with gzip.open(path, "wb") as fh:
        hdu.writeto(fh)
    real = tempfile.TemporaryFile

    class Full:
        """A file that takes 3000 bytes, then fails as a full disk does."""

        def __init__(self) -> None:
            self.inner = real()
            self.n = 0

        def write(self, data: bytes) -> int:
            room = 3000 - self.n
            if room <= 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.n += min(room, len(data))
            return self.inner.write(bytes(data[:room]))

        def __getattr__(self, name: str):
            return getattr(self.inner, name)

    monkeypatch.setattr(tempfile, "TemporaryFile", lambda *a, **k: Full())
    with FrameSource(path) as src, pytest.raises(OutputError, match="temporary folder"):
        src.read()


def test_stored_histograms_cannot_inject_markup(demo_night, tmp_path):
    """A tampered previews/*.json (SVG with a script) never reaches report.html."""
    out = tmp_path / "out"
    shutil.copytree(demo_night / "out", out)
    from ccdcal.report.page import build_report

    build_report(out)
    for facts_path in (out / "previews").glob("master-*.json"):
        facts = json.loads(facts_path.read_text())
        facts["histogram"] = {"counts": ["<script>alert(1)</script>"], "lo": 0, "hi": 1, "median": 0,
                              "below": 0, "above": 0}
        facts["histogram_svg"] = "<svg><script>alert(2)</script></svg>"
        facts["unit"] = "<script>alert(3)</script>"
        facts_path.write_text(json.dumps(facts))
    html = build_report(out).read_text()
    assert "<script>alert" not in html
    assert html.count("<svg") >= 1                     # the histograms were drawn again from the masters


def test_header_cleaning_warns_and_keeps_the_frame(small_night, tmp_path):
    from ccdcal.planning.inventory import scan

    raw = fresh(small_night, tmp_path / "raw")
    set_card(raw / "m51_V_001.fits", "OBJECT", "NGC\u00a0891 é".encode())
    with pytest.warns(CcdcalWarning, match="non-ASCII"):
        inventory = scan(raw, flag=False)
    info = next(f for f in inventory.frames if f.name == "m51_V_001.fits")
    assert info.object is not None and info.object.startswith("NGC?")
    assert not inventory.skipped


def test_two_reductions_in_one_process_do_not_share_a_folder(small_night, tmp_path):
    """Two notebook calls (or two Dask clients in one process) on one OUT: the second is
    refused while the first holds it (flock belongs to each open file, not to the process)."""
    from ccdcal.pipeline.run import ReduceOptions, reduce

    raw = fresh(small_night, tmp_path / "raw")
    out = tmp_path / "out"
    out.mkdir()
    with output_lock(out), pytest.raises(InputError, match="in use by pid"):
        reduce(raw, out, options=ReduceOptions(report=False))
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]       # nothing written
    reduce(raw, out, options=ReduceOptions(report=False))
    assert_clean_output(out)


def test_an_unwritable_output_folder_is_one_line(tmp_path, monkeypatch):
    """A folder where the lock file cannot be made (read-only, root or not): one line for a
    writer; a reader goes on (nobody can be writing there through ccdcal)."""
    import errno

    def refuse(path, flags, mode=0o777):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(InputError, match="cannot make its lock file .*Permission denied"):
        with output_lock(tmp_path):
            pass
    with output_lock(tmp_path, shared=True):
        pass


def test_demo_never_writes_over_a_real_night(tmp_path):
    raw = tmp_path / "night" / "raw"
    raw.mkdir(parents=True)
    fits.PrimaryHDU(np.ones((8, 8), np.uint16), fits.Header([("IMAGETYP", "BIAS")])).writeto(raw / "bias_001.fits")
    before = tree_digest(tmp_path)
    result = ccdcal("demo", tmp_path / "night", "--no-reduce")
    assert result.returncode == 2 and "did not make" in one_line_error(result)
    assert tree_digest(tmp_path) == before
    again = ccdcal("demo", tmp_path / "fresh", "--no-reduce", "--size", "64")
    assert again.returncode == 0, again.stderr
    assert ccdcal("demo", tmp_path / "fresh", "--no-reduce", "--size", "64").returncode == 0   # over a demo: fine


def test_report_refuses_previews_linked_into_the_raws(demo_night, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(demo_night / "out", out)
    raw = demo_night / "raw"
    before = tree_digest(raw)
    shutil.rmtree(out / "previews")
    (out / "previews").symlink_to(raw.resolve())
    result = ccdcal("report", out)
    assert result.returncode == 2 and "previews" in one_line_error(result)
    assert tree_digest(raw) == before
