# The README's two commands: `make demo` and `make test`. Both create ./.venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test lean-check fuzz benchmark weights lfsr-baselines

# Two stamps: .lean is the package alone (`pip install -e .`: what `medsr upscale` needs);
# .installed adds the extras the test suite exercises. `make demo` needs only the first.
$(VENV)/.lean: pyproject.toml
	@echo "make: creating $(VENV) with MedSR's runtime dependencies (torch CPU, MONAI, SimpleITK, OpenVINO, ...)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first: 2.13.0 is the CPU build on our machines; an unpinned torch pulls CUDA.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed: $(VENV)/.lean
	@echo "make: adding the test extras to $(VENV) (.[test]): pytest, hypothesis, ONNX Runtime, NNCF,"
	@echo "      Ray, the DICOMweb/DIMSE clients, MkDocs; and (.[slicer-test]) slicer-core and PySide6"
	@echo "      for the Slicer module's tests"
	$(PY) -m pip install --quiet -e ".[test,slicer-test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.lean
	$(VENV)/bin/medsr demo --out medsr-demo --overwrite

# Testing/install_test_tools.sh: tools that do not come from PyPI (it says what it installs and
# why before installing); never fails the build (a test without its tool skips, saying why).
test: $(VENV)/.installed
	-sh Testing/install_test_tools.sh
	$(PY) -m pytest -q

# A fresh venv with only `pip install .` (torch CPU first), `medsr upscale` on the bundled sample
# and on a 2-D PNG, and its size against this venv's: a few minutes, downloads from PyPI.
lean-check: $(VENV)/.installed
	MEDSR_LEAN_CHECK=1 $(PY) -m pytest -q -s Testing/test_lean_install.py

# The hypothesis fuzz suite with its long profile (about 1000 examples per property).
fuzz: $(VENV)/.installed
	MEDSR_FUZZ=long $(PY) -m pytest -q Testing/test_fuzz_inputs.py

benchmark: $(VENV)/.installed
	$(PY) benchmarks/bench_engine.py

# Retrain every shipped model from ../shared/data (CPU time per model ends up in its card's
# cpu_seconds) and copy the exports into MedSRLib/models/weights/. Same commands, in the same order, as
# the sessions that produced the shipped files (x3/x4 runs start from the x2 exports; LFSR from
# the edsr_lite exports; the multi-scale EDSR from all three; SRGAN from SRResNet; hybrid X-ray
# from hybrid MR x4). About 9 CPU hours on 2 cores (the cards' cpu_seconds sum to 5.1 h, plus
# 3.8 h of the earlier edsr_lite stages whose exports the later stages start from).
DATA_ROOT ?= ../shared/data
TRAIN := $(VENV)/bin/medsr train --data-root $(DATA_ROOT) --no-progress
# The four extra MR series of the x4 default (made by benchmarks/mr_data/prepare_mr_data.py from
# a snapshot of oncoray/mirp), and a data root holding the shared data plus them as mr_more/.
MR_MORE ?= ../extra_data/mr_more
WIDE_ROOT := runs/data_root_with_mr_more
SRCNN_CPU_ARGS := --steps 1500 --set optimizer.lr=5.0e-4 \
	--set 'scheduler={milestones: [1000, 1300], gamma: 0.5}' \
	--set train.val_every=250 --set train.checkpoint_every=250
MR_X4 := --set scale=4 --set init_from=runs/edsr_lite_x4_stage4/edsr_lite_x4.safetensors
SHIPPED_RUNS := edsr_lite_x2_stage4 edsr_lite_x4_grown edsr_lite_x3_stage2 fmen_x2 fmen_x3 fmen_x4 srcnn_x2 srcnn_x3 srcnn_x4 \
	improved_srcnn_x2 improved_srcnn_x3 improved_srcnn_x4 lesion_detector lfsr_x2 lfsr_x4 \
	vdsr_cpu_x2 vdsr_cpu_x3 vdsr_cpu_x4 edsr_multiscale_lite
# run:modality -> MedSRLib/models/weights/<stem>_<modality>.safetensors (one file per modality, zoo.weights_files)
MODALITY_RUNS := srresnet_mr_x2:mr srresnet_mr_x4:mr srresnet_xr_x4:xr srgan_mr_x2:mr srgan_mr_x4:mr \
	srgan_xr_x4:xr hybrid_mr_x2:mr hybrid_mr_x4:mr hybrid_xr_x4_from_mr:xr
weights: $(VENV)/.installed
	$(TRAIN) edsr_lite_x2
	$(TRAIN) edsr_lite_x2_stage2
	$(TRAIN) edsr_lite_x4
	$(TRAIN) edsr_lite_x3
	$(TRAIN) edsr_lite_x2_stage3
	$(TRAIN) edsr_lite_x2_stage4
	$(TRAIN) edsr_lite_x4_stage2
	$(TRAIN) edsr_lite_x4_stage3
	$(TRAIN) edsr_lite_x3_stage2
	$(TRAIN) edsr_lite_x4_stage4
	mkdir -p $(WIDE_ROOT) && for d in ct mr sarcoma brats; do ln -sfn $(abspath $(DATA_ROOT))/$$d $(WIDE_ROOT)/$$d; done \
	  && ln -sfn $(abspath $(MR_MORE)) $(WIDE_ROOT)/mr_more
	$(VENV)/bin/medsr train --data-root $(WIDE_ROOT) --no-progress edsr_lite_x4_grown
	$(TRAIN) srcnn_x2 $(SRCNN_CPU_ARGS)
	$(TRAIN) srcnn_x2 $(SRCNN_CPU_ARGS) --set scale=3 --set name=srcnn_x3 --set output.dir=runs/srcnn_x3
	$(TRAIN) srcnn_x2 $(SRCNN_CPU_ARGS) --set scale=4 --set name=srcnn_x4 --set output.dir=runs/srcnn_x4
	$(TRAIN) improved_srcnn_x2 $(SRCNN_CPU_ARGS)
	$(TRAIN) improved_srcnn_x2 $(SRCNN_CPU_ARGS) --set scale=3 --set name=improved_srcnn_x3 --set output.dir=runs/improved_srcnn_x3
	$(TRAIN) improved_srcnn_x2 $(SRCNN_CPU_ARGS) --set scale=4 --set name=improved_srcnn_x4 --set output.dir=runs/improved_srcnn_x4
	$(TRAIN) lesion_detector
	$(TRAIN) lfsr_x2
	$(TRAIN) lfsr_x2 $(MR_X4) --set name=lfsr_x4 --set output.dir=runs/lfsr_x4
	for run in fmen_x2 fmen_x3 fmen_x4 vdsr_cpu_x2 vdsr_cpu_x3 vdsr_cpu_x4 edsr_multiscale_lite srresnet_mr_x2 srresnet_mr_x4 \
	  srresnet_xr_x4 srgan_mr_x2 srgan_mr_x4 srgan_xr_x4 hybrid_mr_x2 hybrid_mr_x4 hybrid_xr_x4_from_mr; do $(TRAIN) $$run; done
	for run in $(SHIPPED_RUNS); do \
	  for f in runs/$$run/*.safetensors; do cp "$$f" "$${f%.safetensors}.json" MedSRLib/models/weights/; done; \
	done
	for pair in $(MODALITY_RUNS); do run=$${pair%%:*}; mod=$${pair##*:}; \
	  for f in runs/$$run/*.safetensors; do stem=$$(basename "$${f%.safetensors}"); \
	    cp "$$f" MedSRLib/models/weights/$${stem}_$$mod.safetensors; sed 's/"weights_file": "[^"]*"/"weights_file": "'$${stem}_$$mod'.safetensors"/' \
	      "$${f%.safetensors}.json" > MedSRLib/models/weights/$${stem}_$$mod.json; \
	  done; \
	done
	# int8 OpenVINO models of the default networks and of VDSR, the heaviest per pixel
	# (calibrated on their training patients)
	$(VENV)/bin/pip install --quiet nncf
	for s in 2 3; do $(PY) -m MedSRLib.evaluation.quantize_int8 --model edsr_lite --scale $$s; done
	$(PY) -m MedSRLib.evaluation.quantize_int8 --model edsr_lite --scale 4 --data-root $(WIDE_ROOT)
	for s in 2 3 4; do $(PY) -m MedSRLib.evaluation.quantize_int8 --model vdsr --scale $$s; done
	# bf16's held-out cost per volume for FMEN (auto keeps fp32 where a volume loses > 0.05 dB)
	for s in 2 3 4; do $(PY) -m MedSRLib.evaluation.bf16_cost --model fmen --scale $$s; done

# Benchmark-only runs for benchmarks/bench_lfsr.py (not shipped): paper 003's whole-slice GAN
# baseline, and LFSR x2 re-trained with k-space noise sigma 20 and 40 (after `make weights`).
lfsr-baselines: $(VENV)/.installed
	$(TRAIN) gan_wholeslice_x2
	$(TRAIN) gan_wholeslice_x2 $(MR_X4) --set name=gan_wholeslice_x4 --set output.dir=runs/gan_wholeslice_x4
	for sigma in 20 40; do $(TRAIN) lfsr_x2 --set name=lfsr_noise$${sigma}_x2 --set output.dir=runs/lfsr_noise$${sigma}_x2 \
	  --set init_from=runs/lfsr_x2/lfsr_x2.safetensors \
	  --set "degradation=[{type: bicubic}, {type: kspace_noise, sigma: $${sigma}}]"; done
