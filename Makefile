# The README's two commands: `make demo` and `make test`. Both create ./.venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test benchmark

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first: 2.13.0 is the CPU build on our machines; an unpinned torch pulls CUDA.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/medsr demo --out medsr-demo --overwrite

test: $(VENV)/.installed
	$(PY) -m pytest -q

benchmark: $(VENV)/.installed
	$(PY) benchmarks/bench_engine.py
