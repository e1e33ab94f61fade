"""Issue 30: ``progress=`` of every long public call is None or False (silent), True (a
``tqdm.auto`` bar: a widget in a notebook, text on stderr elsewhere) or a function
``f(items, description, total=None)``; anything else is a one-line TypeError raised before
any work. The notebook side runs in a real kernel (nbclient)."""

from __future__ import annotations

from pathlib import Path

import nbclient
import nbformat
import numpy as np
import pytest
from astropy.io import fits

import ccdcal
import starfield as sf
from ccdcal._shared.progress import resolve_progress
from test_notebook import _kernel_manager

# a night small enough for a notebook cell of a few seconds (numba's cache warm)
NIGHT = dict(size=64, n_bias=3, n_dark=2, n_flat=2, n_light=1)
REDUCE_STAGES = ["scanning", "checking frames", "building masters", "calibrating lights"]
CELL_TIMEOUT = 300      # seconds: a fresh checkout compiles the kernels in the notebook's kernel


class Recorder:
    """A progress function that records each stage: its description, the total it was given
    (or the length of its items) and how many items it handed on."""

    def __init__(self) -> None:
        self.stages: list[dict] = []

    def __call__(self, items, description, total=None):
        if total is None and hasattr(items, "__len__"):
            total = len(items)
        stage = {"description": description, "total": total, "count": 0}
        self.stages.append(stage)
        for item in items:
            stage["count"] += 1
            yield item

    def descriptions(self) -> list[str]:
        return [s["description"] for s in self.stages]

    def counts(self, description: str) -> list[int]:
        return [s["count"] for s in self.stages if s["description"] == description]


@pytest.fixture(scope="module")
def night(tmp_path_factory) -> Path:
    from ccdcal.demo import write_night

    return write_night(tmp_path_factory.mktemp("progress") / "raw", seed=30, **NIGHT)


def _files(raw: Path, prefix: str) -> list[Path]:
    return sorted(raw.glob(f"{prefix}*.fits"))


def _no_report() -> ccdcal.ReduceOptions:
    return ccdcal.ReduceOptions(report=False)


# -- the one place the forms are resolved ---------------------------------------------------------
def test_none_and_false_are_silent_and_a_function_is_used_as_given():
    def mine(items, description, total=None):
        return items

    assert resolve_progress(None) is None
    assert resolve_progress(False) is None
    assert resolve_progress(mine) is mine


def test_true_is_a_bar_on_stderr_outside_a_notebook_that_hands_on_every_item(capsys):
    bar = resolve_progress(True)
    assert list(bar(iter(range(7)), "counting", total=7)) == list(range(7))
    out = capsys.readouterr()
    assert out.out == ""
    assert "counting" in out.err and "7/7" in out.err


@pytest.mark.parametrize("bad", ["yes", 1, 0, 1.5, [True], np.True_, object()])
def test_any_other_value_is_a_one_line_type_error_naming_the_accepted_forms(bad):
    with pytest.raises(TypeError) as info:
        resolve_progress(bad)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("progress=")
    for form in ("True", "False or None", "f(items, description, total=None)"):
        assert form in message


# -- every long public call takes the forms --------------------------------------------------------
def _public_calls(raw: Path, out: Path) -> dict:
    """Each long public call, on real inputs, writing (where it writes) under ``out``."""
    lights, biases = _files(raw, "m51") or [raw / "m51.fits"], _files(raw, "bias") or [raw / "bias.fits"]
    return {
        "scan": lambda progress: ccdcal.scan(raw, progress=progress),
        "reduce": lambda progress: ccdcal.reduce(raw, out, options=_no_report(), progress=progress),
        "combine": lambda progress: ccdcal.combine(biases, progress=progress),
        "calibrate": lambda progress: ccdcal.calibrate(lights, bias=biases[0], output=out, progress=progress),
        "stack": lambda progress: ccdcal.stack(lights, out / "stack.fits", progress=progress),
    }


@pytest.mark.parametrize("name", ["scan", "reduce", "combine", "calibrate", "stack"])
def test_a_bad_progress_fails_before_any_file_is_read_or_written(name, night, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(TypeError, match="f\\(items, description, total=None\\)"):
        _public_calls(night, out)[name]("yes")
    assert not out.exists()
    # inputs that are not there: the progress value is still what is reported, so it was
    # checked before any input was looked at
    with pytest.raises(TypeError, match="progress='yes'"):
        _public_calls(tmp_path / "missing", out)[name]("yes")


def test_reduce_hands_every_stage_to_a_progress_function(night, tmp_path):
    recorder = Recorder()
    result = ccdcal.reduce(night, tmp_path / "out", options=_no_report(), progress=recorder)
    assert recorder.descriptions() == REDUCE_STAGES
    for stage in recorder.stages:      # each stage's items handed on to the end, as many as it said
        assert stage["count"] == stage["total"] > 0, stage
    assert recorder.counts("calibrating lights") == [len(result.lights)]
    assert recorder.counts("building masters") == [len(result.masters)]


def test_the_masters_bar_counts_each_master_as_it_is_built(night, tmp_path, monkeypatch):
    from ccdcal.pipeline import run as pipeline

    counted = {"masters": 0}

    def progress(items, description, total=None):
        for item in items:
            yield item
            # where a bar (tqdm's, rich's) counts: once the caller asks for the next item
            counted["masters"] += description == "building masters"

    seen: list[int] = []
    accept = pipeline._accept_master

    def accept_and_look(*args, **kwargs):
        seen.append(counted["masters"])
        return accept(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_accept_master", accept_and_look)
    result = ccdcal.reduce(night, tmp_path / "out", options=_no_report(), progress=progress)
    assert seen == list(range(1, len(result.masters) + 1))   # not one behind, at 0 after the first


def test_reduce_with_true_draws_each_stage_on_stderr_and_prints_nothing(night, tmp_path, capsys):
    result = ccdcal.reduce(night, tmp_path / "out", options=_no_report(), progress=True)
    out = capsys.readouterr()
    assert out.out == ""
    for stage in REDUCE_STAGES:
        assert f"{stage}: 100%" in out.err
    assert result.lights and not result.warnings   # tqdm's own output is not a warning of the night


@pytest.mark.parametrize("quiet", [None, False])
def test_reduce_without_progress_is_silent(quiet, night, tmp_path, capsys):
    result = ccdcal.reduce(night, tmp_path / "out", options=_no_report(), progress=quiet)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    assert result.lights


def test_scan_with_true_draws_its_stages(night, capsys):
    inventory = ccdcal.scan(night, progress=True)
    out = capsys.readouterr()
    assert out.out == ""
    files = len(list(night.glob("*.fits")))
    assert "scanning: 100%" in out.err and f"{files}/{files}" in out.err
    assert "checking frames: 100%" in out.err
    assert inventory.frames


def test_combine_of_files_reports_its_levels_and_tiles(night):
    flats = _files(night, "flat_V")
    recorder = Recorder()
    # 16-bit files: the levels come from histograms of the raw integers
    from_files = ccdcal.combine(flats, scale="median", memory="64KiB", progress=recorder)
    assert recorder.descriptions()[0] == "measuring levels"
    assert recorder.counts("measuring levels") == [len(flats)]
    tiles = recorder.counts("combining")
    assert len(tiles) == 1 and tiles[0] > 1          # a small budget: several tiles, every one reported
    # arrays: levels measured on the decoded values, one frame at a time
    recorder = Recorder()
    arrays = [fits.getdata(f).astype(np.float32) for f in flats]
    from_arrays = ccdcal.combine(arrays, scale="median", memory="64KiB", progress=recorder)
    assert recorder.counts("measuring levels") == [len(flats)]
    assert recorder.counts("combining") == tiles
    np.testing.assert_array_equal(from_files.data, from_arrays.data)   # the progress changes nothing


def test_combine_with_true_prints_nothing_on_stdout(night, capsys):
    ccdcal.combine(_files(night, "bias"), progress=True)
    out = capsys.readouterr()
    assert out.out == "" and "combining: 100%" in out.err


def test_calibrate_reports_each_frame_given_as_files_or_arrays(night, tmp_path):
    lights = _files(night, "m51")       # their overscan only: enough to show the progress
    recorder = Recorder()
    written = ccdcal.calibrate(lights, output=tmp_path, allow_uncorrected=True, progress=recorder)
    assert recorder.stages == [{"description": "calibrating", "total": len(lights), "count": len(lights)}]
    assert len(written) == len(lights)
    recorder = Recorder()
    frames = ccdcal.calibrate([fits.getdata(f) for f in lights], allow_uncorrected=True, progress=recorder)
    assert recorder.counts("calibrating") == [len(lights)] == [len(frames)]


def test_stack_reports_the_stars_found_and_the_rows_stacked(tmp_path):
    shape = (160, 160)
    stars = sf.catalogue(shape, 12, seed=3)
    paths = []
    for k, matrix in enumerate([np.eye(3), sf.shift(2.3, -1.4), sf.shift(-1.7, 2.6)]):
        data, sigma = sf.observe(shape, stars, matrix, seed=k)
        paths.append(sf.write_light(tmp_path / f"f{k}.fits", data, sigma))
    recorder = Recorder()
    run = ccdcal.stack(paths, tmp_path / "stack.fits", memory="1MiB", progress=recorder)
    assert recorder.descriptions() == ["finding stars", "stacking"]
    assert recorder.counts("finding stars") == [len(paths)]
    stacked = recorder.stages[1]
    assert stacked["count"] == stacked["total"] > 1      # several bands of rows, each reported
    assert run.output.is_file()


# -- in a notebook ------------------------------------------------------------------------------------
def _widgets(nb: nbformat.NotebookNode) -> dict[str, dict]:
    """The widget models the kernel left, by model id (nbclient stores them in the metadata)."""
    return nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]


def _model(models: dict[str, dict], ref: str) -> dict:
    return models[ref.removeprefix("IPY_MODEL_")]["state"]


def test_progress_true_in_a_notebook_shows_a_widget_per_stage_and_prints_nothing(tmp_path, monkeypatch):
    import ipywidgets  # noqa: F401 - in the test extras: without it tqdm draws text, not a widget

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("import ccdcal\nfrom ccdcal.demo import write_night\n\n"
                                  f"raw = write_night('raw', seed=30, **{NIGHT!r})"),
        nbformat.v4.new_code_cell("result = ccdcal.reduce(raw, 'out', progress=True,\n"
                                  "                       options=ccdcal.ReduceOptions(report=False))"),
        nbformat.v4.new_code_cell("len(result.lights)"),
    ])
    client = nbclient.NotebookClient(
        nb, km=_kernel_manager(tmp_path / "kernels"), timeout=CELL_TIMEOUT, startup_timeout=120,
        resources={"metadata": {"path": str(work)}}, allow_errors=False)
    client.execute()       # raises CellExecutionError (with the traceback) or CellTimeoutError

    outputs = nb.cells[1].outputs
    streams = [o for o in outputs if o.output_type == "stream"]
    assert not [o for o in streams if o.name == "stdout"], streams            # nothing printed
    assert not [o for o in streams if "%|" in o.text], streams                # no text bar either
    views = [o.data["application/vnd.jupyter.widget-view+json"]["model_id"] for o in outputs
             if o.output_type == "display_data"]
    assert len(views) == len(REDUCE_STAGES)
    models = _widgets(nb)
    for stage, view in zip(REDUCE_STAGES, views, strict=True):
        label, bar, _ = (_model(models, ref) for ref in models[view]["state"]["children"])
        assert f"{stage}: 100%" in label["value"].replace("\u2007", " ")   # tqdm's figure spaces
        assert bar["value"] == bar["max"] > 0 and bar["bar_style"] == "success", (stage, bar)
    assert nb.cells[2].outputs[0].data["text/plain"] == "2"
