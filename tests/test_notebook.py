"""examples/night.ipynb runs top to bottom on the real data, in a kernel of this interpreter."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest

from conftest import REPO

NOTEBOOK = REPO / "examples" / "night.ipynb"
CELL_TIMEOUT = 120      # seconds for any one cell (the whole notebook takes well under a minute)
KERNEL = "ccdcal-test-python"

pytestmark = pytest.mark.realdata


def _kernel_manager(kernel_dir: Path):
    """A kernel manager for this very interpreter, through a kernelspec written in ``kernel_dir``.

    Nothing is registered globally, and a ``python3`` kernelspec installed elsewhere (a user's
    ~/.local/share/jupyter, another environment) cannot be picked up instead: the spec manager
    looks in ``kernel_dir`` only.
    """
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec = kernel_dir / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python {sys.version_info.major}.{sys.version_info.minor} (ccdcal tests)",
        "language": "python",
    }))
    specs = KernelSpecManager(kernel_dirs=[str(kernel_dir)], ensure_native_kernel=False)
    return KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)


def test_notebook_runs(real_data, tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(cell.get("outputs") or cell.get("execution_count")
                   for cell in nb.cells if cell.cell_type == "code"), \
        "examples/night.ipynb is committed without outputs: clear them before committing"

    work = tmp_path / "examples"               # a working copy: outputs land in the temporary folder
    work.mkdir()
    shutil.copy(NOTEBOOK, work / NOTEBOOK.name)
    # the kernel inherits the environment: the data, and Jupyter's and IPython's own files kept here
    monkeypatch.setenv("CCDCAL_TEST_DATA", str(real_data))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))

    client = nbclient.NotebookClient(
        nb, km=_kernel_manager(tmp_path / "kernels"), timeout=CELL_TIMEOUT, startup_timeout=120,
        resources={"metadata": {"path": str(work)}}, allow_errors=False)
    client.execute()       # raises CellExecutionError (with the traceback) or CellTimeoutError

    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    outputs = [o for cell in code for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    for last_line in ("inventory", "bias", "result"):      # scan, combine and reduce results
        html = [o["data"]["text/html"] for cell in code if cell.source.splitlines()[-1] == last_line
                for o in cell.outputs if "text/html" in o.get("data", {})]
        assert html, f"the cell ending in {last_line!r} shows an HTML table"
    assert "report.html" in html[0], "the reduce result links to its report"
    run = next(cell for cell in code if "ccdcal.reduce(" in cell.source and "progress=True" in cell.source)
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in run.outputs), \
        "reduce(progress=True) shows its bars as widgets"
    assert not [o for o in run.outputs if o.get("name") == "stdout"], "the library prints nothing"
    assert any("image/png" in o.get("data", {}) for o in outputs), "the stretches and show() display images"
    assert (work / "night-out" / "report.html").is_file()
    assert len(list((work / "night-out" / "calibrated").glob("*.fits"))) == 6
