# ccdcal: the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.installed-docs

.PHONY: demo test bench lint docs clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "ccdcal needs Python 3.11 or newer (set PYTHON=python3.x)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ccdcal demo demo-night

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile -q

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[test,bench]"
	$(BIN)/python benchmarks/run.py
	$(BIN)/python benchmarks/night.py
	$(BIN)/python benchmarks/dask_scaling.py
	$(BIN)/python benchmarks/stacking.py
	$(BIN)/python benchmarks/stacking.py --n 24 --size 2048x2048 --cases mono
	$(BIN)/python benchmarks/stacking.py --n 38 --size 1080x1920 --cases osc \
		--variants '--debayer mhc --interpolation bilinear;--debayer rcd'
	$(BIN)/python benchmarks/many_frames.py --dask

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[docs]"
	@touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(BIN)/sphinx-build -W --keep-going -b html docs docs/_build/html
	@echo "docs: open docs/_build/html/index.html"

clean:
	rm -rf demo-night .pytest_cache build *.egg-info src/*.egg-info
