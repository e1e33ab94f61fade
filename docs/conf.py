"""Sphinx configuration of the ccdcal documentation (``make docs``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import ccdcal

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent

project = "ccdcal"
author = "the ccdcal developers"
copyright = "the ccdcal developers, BSD-3-Clause"
release = version = ccdcal.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",     # numpy-style docstrings
    "sphinxarg.ext",           # the CLI reference from ccdcal.cli.build_parser
    "myst_nb",                 # the example notebook, shown as committed (not executed)
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "**.ipynb_checkpoints"]

# -- API pages from the docstrings ---------------------------------------------------------------
autosummary_generate = True
autodoc_typehints = "none"            # the numpy-style docstrings state the types, units and shapes
autodoc_member_order = "bysource"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False

# -- the notebook ---------------------------------------------------------------------------------
# Sphinx reads sources under docs/ only: the committed notebook is copied in at each build.
(DOCS / "examples").mkdir(exist_ok=True)
shutil.copy2(ROOT / "examples" / "night.ipynb", DOCS / "examples" / "night.ipynb")
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath"]

# -- HTML ---------------------------------------------------------------------------------------------
html_theme = "alabaster"
html_title = f"ccdcal {release}"
