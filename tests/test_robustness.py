"""Never lose or corrupt data: a corpus of bad inputs, a full disk, SIGKILL and resume, fuzzed headers."""

from __future__ import annotations

import errno
import hashlib
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

from ccdcal.errors import CcdcalError, InputError, OutputError
from conftest import copy_frames


def ccdcal(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ccdcal.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def stray_partials(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".partial")]


def make_bad_corpus(folder: Path) -> dict[str, str]:
    """One bad file per case; returns name -> words the error message must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "not_fits.fits").write_text("SIMPLE? no, this is a text file\n" * 200)
    (folder / "empty.fits").write_bytes(b"")
    good = fits.PrimaryHDU(np.ones((64, 64), dtype=np.uint16))
    good.header["IMAGETYP"] = "LIGHT"
    good.writeto(folder / "whole.fits")
    data = (folder / "whole.fits").read_bytes()
    (folder / "truncated.fits").write_bytes(data[: len(data) // 2 + 100])
    (folder / "whole.fits").unlink()
    fits.PrimaryHDU(header=fits.Header([("IMAGETYP", "LIGHT")])).writeto(folder / "nodata.fits")
    fits.PrimaryHDU(np.zeros((3, 16, 16), dtype=np.float32)).writeto(folder / "cube.fits")
    fits.PrimaryHDU(np.zeros((0, 16), dtype=np.float32)).writeto(folder / "zerosize.fits")
    return {
        "zerosize.fits": "zero-size",
        "not_fits.fits": "not a readable FITS file",
        "empty.fits": "empty",
        "truncated.fits": "truncated",
        "nodata.fits": "no 2-D image",
        "cube.fits": "3-D",
    }


@pytest.fixture
def corpus(tmp_path):
    expected = make_bad_corpus(tmp_path / "bad")
    return tmp_path / "bad", expected


def test_each_bad_file_gives_one_line_exit_2_naming_the_file(corpus):
    folder, expected = corpus
    before = digest(folder)
    for name, words in expected.items():
        proc = ccdcal("stats", folder / name)
        assert proc.returncode == 2, (name, proc.stderr)
        assert name in proc.stderr and words in proc.stderr, (name, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert digest(folder) == before, "raw files must never change"


def test_reduce_skips_bad_files_reduces_the_rest_and_exits_3(corpus, demo_night, tmp_path):
    folder, expected = corpus
    for f in sorted((demo_night / "raw").glob("*_00[12].fits")):
        shutil.copy(f, folder / f.name)
    before = digest(folder)
    out = tmp_path / "out"
    proc = ccdcal("reduce", folder, "-o", out, "--no-report")
    assert proc.returncode == 3, proc.stderr
    for name in expected:
        assert name in proc.stdout.replace("\n", "")
    assert (out / "calibrated" / "m51_V_001.fits").exists()
    assert digest(folder) == before
    assert not stray_partials(out)
    assert "Traceback" not in proc.stderr


def test_strict_makes_a_skipped_input_fatal(corpus, demo_night, tmp_path):
    folder, _ = corpus
    for f in sorted((demo_night / "raw").glob("bias_00[12].fits")):
        shutil.copy(f, folder / f.name)
    proc = ccdcal("reduce", folder, "-o", tmp_path / "out", "--strict", "--no-report")
    assert proc.returncode == 2 and "--strict" in proc.stderr
    assert not (tmp_path / "out" / "masters").exists()


def test_light_without_exposure_time_is_skipped_when_a_dark_must_be_scaled(demo_night, tmp_path):
    raw = copy_frames(demo_night / "raw", tmp_path / "raw", "bias_00[1-3].fits", "dark_300s_00[1-3].fits",
                      "m51_V_001.fits")
    with fits.open(raw / "m51_V_001.fits", mode="update") as hdul:
        del hdul[0].header["EXPTIME"]
        del hdul[0].header["EXPOSURE"]
    proc = ccdcal("reduce", raw, "-o", tmp_path / "out", "--no-report")
    assert proc.returncode == 3
    assert "m51_V_001.fits" in proc.stdout and "exposure time" in proc.stdout.replace("\n", " ")
    assert (tmp_path / "out" / "masters" / "master_dark_300s.fits").exists()


def test_mixed_sizes_are_reduced_as_separate_groups(demo_night, tmp_path):
    raw = copy_frames(demo_night / "raw", tmp_path / "raw", "bias_00[1-3].fits")
    for i in range(3):
        hdu = fits.PrimaryHDU(np.full((32, 48), 1000 + i, dtype=np.uint16))
        hdu.header["IMAGETYP"] = "Bias Frame"
        hdu.header["XBINNING"] = hdu.header["YBINNING"] = 2
        hdu.writeto(raw / f"small_bias_{i}.fits")
    proc = ccdcal("reduce", raw, "-o", tmp_path / "out", "--no-report")
    assert proc.returncode == 0, proc.stderr
    masters = sorted(p.name for p in (tmp_path / "out" / "masters").iterdir())
    assert len(masters) == 2 and all(m.startswith("master_bias_") for m in masters)


def test_unwritable_output_folder_is_exit_2(demo_night, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    proc = ccdcal("reduce", demo_night / "raw", "-o", blocker / "out", "--no-report")
    assert proc.returncode == 2 and "output folder" in proc.stderr and "Traceback" not in proc.stderr


def test_disk_full_removes_the_partial_file_and_keeps_earlier_outputs(demo_night, tmp_path, monkeypatch):
    from ccdcal.io import writer
    from ccdcal.pipeline.run import ReduceOptions, reduce, verify

    real_write = writer._write_hdus
    calls = {"n": 0}

    def write_hdus(tmp, hdul, direct=False):
        calls["n"] += 1
        if calls["n"] == 3:  # the third FITS output: write half of it, then the disk is full
            Path(tmp).write_bytes(b"\0" * 5000)
            time.sleep(1.0)  # meanwhile the next masters are built and queued: none may be written
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(tmp, hdul, direct)

    monkeypatch.setattr(writer, "_write_hdus", write_hdus)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="disk filled up"):
        reduce([demo_night / "raw"], out, options=ReduceOptions(report=False))
    assert not stray_partials(out)
    written = sorted((out / "masters").iterdir())
    assert len(written) == 2
    monkeypatch.setattr(writer, "_write_hdus", real_write)
    check = verify(out)
    assert not check.problems and len(check.ok) == 2


def _gated_fsync(monkeypatch, *, fail: OSError | None = None):
    """os.fsync that, on a file (not a folder), waits until the returned event is set (10 s at
    most) and records whether it was, and its thread; then fails with ``fail`` when given."""
    import stat
    import threading

    real = os.fsync
    gate = threading.Event()
    calls = []

    def fsync(fd):
        if stat.S_ISREG(os.fstat(fd).st_mode):
            calls.append((gate.wait(timeout=10), threading.current_thread().name))
            if fail is not None:
                raise fail
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return gate, calls


def test_work_given_to_a_fits_write_runs_while_the_file_is_made_durable(tmp_path, monkeypatch):
    """write_fits(meanwhile=) runs ``meanwhile`` (a light's previews) while the written file is
    fsync'ed in another thread, before it is renamed into place: the fsync here waits for the
    work to release it. The call returns with the whole file in place, and the work gets the
    file's DATASUM."""
    from ccdcal.io.writer import write_fits

    gate, calls = _gated_fsync(monkeypatch)
    path = tmp_path / "out" / "light.fits"
    data = np.arange(12000, dtype=np.float32).reshape(100, 120)
    seen = []

    def meanwhile(datasum):
        seen.append((datasum, sorted(p.name for p in path.parent.iterdir())))
        gate.set()

    write_fits(path, data, fits.Header({"OBJECT": "x"}), uncertainty=data / 10, meanwhile=meanwhile)
    [(datasum, names)] = seen
    assert names == [f".light.fits.{os.getpid()}.partial"]      # written, not yet in place
    assert calls == [(True, "ccdcal-commit")]                     # released by the work: concurrent
    with fits.open(path, checksum=True) as hdul:
        assert np.array_equal(hdul[0].data, data) and hdul[0].header["DATASUM"] == datasum
    assert sorted(p.name for p in path.parent.iterdir()) == ["light.fits"]


def test_a_failed_fsync_beside_the_given_work_leaves_no_file_and_says_so(tmp_path, monkeypatch):
    """The disk fills up while the file is made durable and the given work fails too: the
    disk's error is raised (one line, as for any write), no file or partial is left, and an
    older file of that name is kept whole. The work's own error alone is raised as it is,
    with the new file in place."""
    from ccdcal.io.writer import write_fits

    path = tmp_path / "light.fits"
    old = np.ones((20, 30), np.float32)
    write_fits(path, old)
    gate, _ = _gated_fsync(monkeypatch, fail=OSError(errno.ENOSPC, "No space left on device"))

    def broken(datasum):
        gate.set()
        raise ValueError("preview failed")

    with pytest.raises(OutputError, match="disk filled up"):
        write_fits(path, np.zeros((20, 30), np.float32), meanwhile=broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["light.fits"]
    assert np.array_equal(fits.getdata(path), old)

    monkeypatch.undo()
    with pytest.raises(ValueError, match="preview failed"):
        write_fits(path, np.zeros((20, 30), np.float32), meanwhile=broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["light.fits"]
    assert not fits.getdata(path).any()


def test_disk_full_on_the_cli_is_exit_1_without_traceback(demo_night, tmp_path):
    script = (
        "import errno, sys\n"
        "from ccdcal.io import writer\n"
        "def boom(tmp, hdul, direct=False):\n"
        "    open(tmp, 'wb').write(b'x' * 100)\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "writer._write_hdus = boom\n"
        "from ccdcal.cli import main\n"
        f"sys.exit(main(['reduce', {str(demo_night / 'raw')!r}, '-o', {str(tmp_path / 'out')!r}, '--no-report']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "disk filled up" in proc.stderr and "Traceback" not in proc.stderr
    assert not stray_partials(tmp_path / "out")


def _fits_data(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): fits.getdata(p).tobytes()
            for p in sorted(folder.rglob("*.fits"))}


@pytest.mark.slow
def test_sigkill_at_any_moment_then_rerun_equals_a_clean_run(tmp_path):
    from ccdcal.demo import write_night

    raw = tmp_path / "raw"
    write_night(raw, size=192, seed=3)
    clean = tmp_path / "clean"
    assert ccdcal("reduce", raw, "-o", clean, "--no-report").returncode == 0
    expected = _fits_data(clean)
    for delay in (0.8, 1.6, 2.4, 3.2):
        out = tmp_path / f"killed_{delay}"
        proc = subprocess.Popen([sys.executable, "-m", "ccdcal.cli", "reduce", str(raw), "-o", str(out), "--no-report"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        rerun = ccdcal("reduce", raw, "-o", out, "--no-report")
        assert rerun.returncode == 0, rerun.stderr
        assert _fits_data(out) == expected, f"killed after {delay}s: rerun differs from a clean run"
        assert not stray_partials(out)
        check = ccdcal("verify", out)
        assert check.returncode == 0, check.stdout


def test_verify_catches_a_modified_output(demo_night, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(demo_night / "out", out)
    assert ccdcal("verify", out).returncode == 0
    target = out / "calibrated" / "m51_R_001.fits"
    blob = bytearray(target.read_bytes())
    blob[-100] ^= 0xFF
    target.write_bytes(bytes(blob))
    proc = ccdcal("verify", out)
    assert proc.returncode == 1 and "m51_R_001.fits" in proc.stdout



def test_manifest_hashes_are_xxh3_of_the_bytes_and_old_sha256_manifests_still_verify(demo_night, tmp_path):
    """Every output's and input's recorded hash is XXH3-128 of the file's bytes (hashed here by
    xxhash in one call); a manifest written before ccdcal took XXH3 (SHA-256 entries) still
    verifies, and still catches a modified output and a changed input."""
    import json

    import xxhash

    out = tmp_path / "out"
    shutil.copytree(demo_night / "out", out)
    manifest = json.loads((out / "manifest.json").read_text())
    inputs = {}
    for rel, entry in manifest["outputs"].items():
        assert "sha256" not in entry
        assert entry["xxh3_128"] == xxhash.xxh3_128((out / rel).read_bytes()).hexdigest(), rel
        for record in entry["inputs"]:
            inputs[record["path"]] = record["xxh3_128"]
    assert inputs and all(v == xxhash.xxh3_128(Path(p).read_bytes()).hexdigest() for p, v in inputs.items())

    def sha(path):
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()

    raw = tmp_path / "raw"
    shutil.copytree(demo_night / "raw", raw)
    for rel, entry in manifest["outputs"].items():   # as the older ccdcal wrote it
        del entry["xxh3_128"]
        entry["sha256"] = sha(out / rel)
        for record in entry["inputs"]:
            record["path"] = str(raw / Path(record["path"]).name)
            del record["xxh3_128"]
            record["sha256"] = sha(record["path"])
    (out / "manifest.json").write_text(json.dumps(manifest))
    clean = ccdcal("verify", out)
    assert clean.returncode == 0 and "0 bad, 0 stale" in clean.stdout, clean.stdout
    target = out / "calibrated" / "m51_R_001.fits"
    blob = bytearray(target.read_bytes())
    blob[-100] ^= 0xFF
    target.write_bytes(bytes(blob))
    light = raw / "m51_R_002.fits"
    light.write_bytes(light.read_bytes()[:-1] + b"x")
    proc = ccdcal("verify", out)
    assert proc.returncode == 1 and "m51_R_001.fits" in proc.stdout
    assert "1 bad, 1 stale" in proc.stdout, proc.stdout
    assert "m51_R_002.fits: stale" in " ".join(proc.stderr.split()), proc.stderr


# -- fuzzing ---------------------------------------------------------------------------------
printable = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30)
header_values = st.one_of(printable, st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False,
                                                                          width=32), st.booleans())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(imagetyp=header_values, exptime=header_values, filt=header_values, biassec=printable, trimsec=printable,
       ccdsum=header_values)
def test_fuzzed_headers_never_crash_classification(imagetyp, exptime, filt, biassec, trimsec, ccdsum):
    from ccdcal.planning.inventory import FrameKind, frame_info

    h = fits.Header()
    for key, value in (("IMAGETYP", imagetyp), ("EXPTIME", exptime), ("FILTER", filt), ("BIASSEC", biassec),
                       ("TRIMSEC", trimsec), ("CCDSUM", ccdsum)):
        try:
            h[key] = value
        except ValueError:
            continue
    info = frame_info(Path("x.fits"), 0, h, (40, 50))
    assert info.kind in FrameKind
    assert info.binning[0] >= 1 and info.binning[1] >= 1


@settings(max_examples=200, deadline=None)
@given(biassec=st.one_of(st.none(), printable, st.from_regex(r"\[\d{1,2}:\d{1,2},\d{1,2}:\d{1,2}\]", fullmatch=True)),
       trimsec=st.one_of(st.none(), printable, st.from_regex(r"\[\d{1,2}:\d{1,2},\d{1,2}:\d{1,2}\]", fullmatch=True)))
def test_fuzzed_sections_raise_only_input_errors(biassec, trimsec):
    from ccdcal.calibration.overscan import overscan_geometry

    try:
        spec, trim = overscan_geometry((40, 50), biassec, trimsec)
    except CcdcalError as exc:
        assert isinstance(exc, InputError) and "\n" not in str(exc)
        return
    if trim is not None:
        assert trim.resolve((40, 50)) == trim
    if spec is not None:
        assert spec.region.resolve((40, 50)) == spec.region


def test_raw_file_is_opened_read_only(demo_night):
    from ccdcal.io.frames import FrameSource

    path = demo_night / "raw" / "bias_001.fits"
    before = path.read_bytes()
    mtime = os.stat(path).st_mtime_ns
    with FrameSource(path) as src:
        rows = src.read_rows(0, 4)
        assert src._file.mode == "rb"  # opened for reading only
        rows[:] = 0                    # the rows are a private copy
    assert path.read_bytes() == before and os.stat(path).st_mtime_ns == mtime


def test_unusable_frames_are_left_out_and_the_rest_reduced(demo_night, tmp_path):
    """A flat of zeros, a flat below the bias and an all-NaN light: each skipped with its reason."""
    raw = copy_frames(demo_night / "raw", tmp_path / "raw", "bias_00[1-3].fits", "flat_V_00[1-3].fits",
                      "m51_V_001.fits")
    header = fits.getheader(raw / "flat_V_001.fits")
    for key in ("BZERO", "BSCALE"):
        header.remove(key, ignore_missing=True)
    fits.PrimaryHDU(np.zeros((256, 288), np.float32), header).writeto(raw / "flat_V_zero.fits")
    fits.PrimaryHDU(np.full((256, 288), -5.0, np.float32), header).writeto(raw / "flat_V_neg.fits")
    header["IMAGETYP"] = "Light Frame"
    fits.PrimaryHDU(np.full((256, 288), np.nan, np.float32), header).writeto(raw / "m51_nan.fits")
    proc = ccdcal("reduce", raw, "-o", tmp_path / "out", "--no-report")
    assert proc.returncode == 3, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("skipped")]
    assert len(lines) == 3
    assert any("flat_V_zero.fits" in ln and "100% of its pixels are 0" in ln for ln in lines)
    assert any("flat_V_neg.fits" in ln and "not above the bias" in ln for ln in lines)
    assert any("m51_nan.fits" in ln and "NaN" in ln for ln in lines)
    assert fits.getheader(tmp_path / "out" / "masters" / "master_flat_V.fits")["NCOMBINE"] == 3
    assert (tmp_path / "out" / "calibrated" / "m51_V_001.fits").exists()


def test_a_group_of_one_frame_is_used_with_a_warning(demo_night, tmp_path):
    raw = copy_frames(demo_night / "raw", tmp_path / "raw", "bias_00[1-3].fits", "dark_300s_001.fits")
    proc = ccdcal("reduce", raw, "-o", tmp_path / "out", "--no-report")
    assert proc.returncode == 0, proc.stderr
    assert "master dark 300 s from a single frame (dark_300s_001.fits): noisy" in proc.stderr.replace("\n", " ")
    assert fits.getheader(tmp_path / "out" / "masters" / "master_dark_300s.fits")["NCOMBINE"] == 1
