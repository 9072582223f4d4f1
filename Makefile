# The README's two commands: `make demo` and `make test`. Both create ./.venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test benchmark weights

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

# Retrain every shipped model from ../shared/data (CPU time per model ends up in its card's
# cpu_seconds) and copy the exports into MedSRLib/weights/. Same commands as the session that
# produced the shipped files; edsr_lite_x3/x4 start from the x2 export.
DATA_ROOT ?= ../shared/data
SRCNN_CPU_ARGS := --steps 1500 --set optimizer.lr=5.0e-4 \
	--set 'scheduler={milestones: [1000, 1300], gamma: 0.5}'
weights: $(VENV)/.installed
	$(VENV)/bin/medsr train edsr_lite_x2 --data-root $(DATA_ROOT) --no-progress
	$(VENV)/bin/medsr train edsr_lite_x4 --data-root $(DATA_ROOT) --no-progress
	$(VENV)/bin/medsr train edsr_lite_x3 --data-root $(DATA_ROOT) --no-progress
	$(VENV)/bin/medsr train srcnn_x2 --data-root $(DATA_ROOT) --no-progress $(SRCNN_CPU_ARGS)
	for run in edsr_lite_x2 edsr_lite_x4 edsr_lite_x3 srcnn_x2; do \
	  cp runs/$$run/*.safetensors MedSRLib/weights/ && \
	  for f in runs/$$run/*.safetensors; do cp "$${f%.safetensors}.json" MedSRLib/weights/; done; \
	done
