# One entry point for a fresh machine. `make demo` and `make test` each set everything up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= demo-output
export HF_HUB_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install sysdeps demo test test-fast lint bench gpu-check clean

# The virtual environment: torch/torchvision pinned by constraints.txt (nothing may pull a newer
# torch), then the package with every extra.
$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch torchvision
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[napari,eval,dev]"
	touch $@

install: $(BIN)/.installed

# A virtual X server for the napari tests and a single-node SLURM for the cluster test (Debian
# packages; need root, otherwise say what to do).
sysdeps:
	@if ! command -v xvfb-run >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq xvfb xauth \
	      libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxkbcommon-x11-0 libxcb-cursor0 \
	      libxcb-shape0 libxcb-render-util0 libxcb-image0 libgl1 libegl1 libfontconfig1 \
	      libdbus-1-3 >/dev/null; \
	  else \
	    echo "xvfb-run not found: install xvfb (apt-get install xvfb) to run the napari tests;" \
	         "they are skipped without a display"; \
	  fi; \
	fi
	@# A private single-node SLURM for the real batch-system test (skipped without it).
	@if ! command -v slurmctld >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    slurmctld slurmd slurm-client munge >/dev/null) \
	  || echo "SLURM packages not installed: the real SLURM test will be skipped"; \
	fi

# The main job: a synthetic Hoechst slide through the bundled U-Net, HiPe and the OME-Zarr writer.
demo: install
	$(BIN)/wsi-hipe demo --out $(OUT)

# The whole test suite, napari tests included (under a virtual X server when there is one).
test: install sysdeps
	@if command -v xvfb-run >/dev/null; then \
	  QT_QPA_PLATFORM=xcb xvfb-run -a -s "-screen 0 1280x1024x24" $(BIN)/pytest; \
	else \
	  $(BIN)/pytest; \
	fi

test-fast: install
	$(BIN)/pytest -m "not slow and not napari"

lint: install
	$(BIN)/ruff check wsi_hipe tests benchmarks pipelines
	$(BIN)/ruff format --check wsi_hipe tests benchmarks pipelines

bench: install
	$(BIN)/python benchmarks/bench_hipe.py

gpu-check:
	PY=$$(test -x $(BIN)/python && echo $(BIN)/python || echo python3) bash benchmarks/gpu_check.sh

clean:
	rm -rf $(OUT) .pytest_cache .ruff_cache
