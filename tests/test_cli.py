"""The ccdcal command: scan table and JSON, dry-run plan, one-line errors with the documented exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ccdcal.cli import main
from conftest import copy_frames


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ccdcal.cli", *args], capture_output=True, text=True, timeout=300)


def test_scan_json_lists_every_frame_with_flags(demo_night, capsys):
    assert main(["scan", str(demo_night / "raw"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 9 + 10 + 10 + 4
    for row in rows:
        assert {"path", "hdu", "kind", "filter", "exptime", "shape", "flags"} <= set(row)
        assert isinstance(row["flags"], list)
    kinds = {r["kind"] for r in rows}
    assert kinds == {"bias", "dark", "flat", "light"}


def test_dry_run_prints_the_plan_and_writes_nothing(demo_night, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["reduce", str(demo_night / "raw"), "-o", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "master bias" in text and "master flat   V" in text and "master dark   300 s" in text
    assert "light m51_V_001.fits" in text and "dark 300 s" in text
    assert not out.exists()


def test_masters_only_folder_says_there_were_no_lights(demo_night, tmp_path, capsys):
    raw = copy_frames(demo_night / "raw", tmp_path / "raw", "bias_*.fits")
    assert main(["reduce", str(raw), "-o", str(tmp_path / "out"), "--no-report"]) == 0
    assert "no lights" in capsys.readouterr().out
    assert (tmp_path / "out" / "masters" / "master_bias.fits").exists()


@pytest.mark.parametrize("args,code,words", [
    (["scan", "no/such/folder"], 2, "no such file or folder"),
    (["reduce", "no/such/folder", "-o", "x"], 2, "no such file or folder"),
    (["reduce", ".", "-o", "x", "--sigma-clip", "a,b"], 2, "LOW,HIGH"),
])
def test_bad_usage_is_one_line_and_exit_2(args, code, words):
    proc = run(*args)
    assert proc.returncode == code
    assert words in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_config_file_sets_options_and_rejects_typos(demo_night, tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('[reduce]\ncombine_method = "median"\nsigma_clip = [4.0, 3.0]\nreport = false\n')
    from ccdcal.pipeline.run import ReduceOptions

    options = ReduceOptions.from_sources(good, {"combine_method": None})
    assert options.combine_method == "median" and options.sigma_clip == (4.0, 3.0) and not options.report
    bad = tmp_path / "bad.toml"
    bad.write_text('sigam_clip = [3, 3]\n')
    proc = run("reduce", str(demo_night / "raw"), "-o", str(tmp_path / "o"), "--config", str(bad))
    assert proc.returncode == 2 and "unknown option 'sigam_clip'" in proc.stderr


def test_the_command_ends_with_its_whole_output_and_code(demo_night, tmp_path):
    """The command skips the interpreter's teardown (cli._exit_now): its piped output is still
    whole (the summary's last line), its code kept, and every file it wrote complete."""
    from ccdcal.pipeline.run import verify

    out = tmp_path / "out"
    proc = run("reduce", str(demo_night / "raw"), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "report:" in proc.stdout and proc.stdout.replace("\n", "").rstrip().endswith("report.html")
    check = verify(out)
    assert not check.problems and len(check.ok) >= 4
    proc = run("reduce", str(demo_night / "raw"), "-o", str(tmp_path / "partial"), "--gain", "-3")
    assert proc.returncode == 3 and "see the skipped inputs below" in proc.stdout   # EXIT_PARTIAL
    assert proc.stdout.replace("\n", "").rstrip().endswith("report.html")


def test_the_commands_colour_choices_are_the_librarys():
    """The CLI spells the Bayer patterns and debayer methods (no numpy at --help) as the library has them."""
    from ccdcal import cli
    from ccdcal.colour.demosaic import METHODS
    from ccdcal.io.headers import BAYER_PATTERNS

    assert cli.BAYER_PATTERNS == BAYER_PATTERNS and cli.DEBAYER_METHODS == tuple(METHODS)


def test_calibrate_offers_no_flag_it_would_ignore(capsys):
    """--masters, --bayer-pattern, --flat-cfa, --debayer and --flat-max-age belong to reduce's plan."""
    from ccdcal.cli import main

    with pytest.raises(SystemExit):
        main(["calibrate", "x.fits", "-o", "out", "--masters", "m"])
    assert "unrecognized arguments: --masters" in capsys.readouterr().err
