# Two commands on a fresh machine (see README.md):
#   make run    set up .venv, build the extension, train the CPU default Dreamer (tpx)
#   make test   set up .venv, build, run the C++ tests (ctest) and the pytest suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CUDA build of torch, so the CUDA kernels compile wherever nvcc exists.
# Use TORCH=2.13.0 for the CPU-only build (smaller download).
TORCH ?= 2.14.1
export MAX_JOBS ?= 2

.PHONY: setup run selfcheck test pytest ctest mutation bench clean FORCE

# `make setup` is incremental, so that a second `make run` (the way to resume) starts
# training at once: each step below runs only when its inputs changed.
#   deps     the packages, when pyproject.toml or the requested torch changed
#   built    the extension, when csrc/, setup.py or the installed torch changed; built in
#            place with ninja in build/, so only changed sources recompile (pip installs
#            the package without it: its build directory is temporary)
#   gl       headless OpenGL for pixel observations and evaluation GIFs (optional; checked
#            by scripts/ensure_gl.sh on every setup, about a second)
STAMPS := $(VENV)/.tpx-stamps
TORCH_VERSION_FILE = $(wildcard $(VENV)/lib/python*/site-packages/torch/version.py)

$(PY):
	$(PYTHON) -m venv $(VENV)

# Holds the requested torch version; rewritten (so newer) only when TORCH changes.
$(STAMPS)/torch-request: FORCE | $(PY)
	@mkdir -p $(STAMPS)
	@echo "$(TORCH)" | cmp -s - $@ || echo "$(TORCH)" > $@

$(STAMPS)/deps: $(STAMPS)/torch-request pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==$(TORCH) ninja pybind11
	TPX_SKIP_EXTENSION=1 $(PY) -m pip install -q --no-build-isolation -e ".[dev,dreamer,experiments]"
	@touch $@

$(STAMPS)/built: $(STAMPS)/deps setup.py $(shell find csrc -type f -not -path "csrc/tests/*") $(TORCH_VERSION_FILE)
	$(PY) setup.py -q build_ext --inplace
	@touch $@

setup: $(STAMPS)/built
	@PYTHON=$(PY) scripts/ensure_gl.sh
	@$(PY) -c "import tpx_ext, torch; print('tpx_ext built: torch', torch.__version__, '| CUDA kernels compiled:', tpx_ext.cuda_compiled())"

# The CPU default training job (~25 min on 2 cores); a second `make run` resumes or, when
# the run is complete, only prints its final evaluation. ARGS adds trainer options.
RUN_DIR ?= runs/default
run: setup
	$(PY) -m tpx_ext.train --logdir $(RUN_DIR) $(if $(wildcard $(RUN_DIR)/checkpoint.pt $(RUN_DIR)/checkpoint.prev.pt),--resume) $(ARGS)
	$(PY) -m tpx_ext.plot $(RUN_DIR) --out $(RUN_DIR)/curve.png

selfcheck: setup
	$(PY) -m tpx_ext

ctest: setup
	PYTHON=$(PY) scripts/cmake_test.sh

pytest: setup
	$(PY) -m pytest python_tests -q

test: setup
	PYTHON=$(PY) scripts/cmake_test.sh
	$(PY) -m pytest python_tests -q

# Mutation testing (not part of `test`; hours on 2 cores, resumable): report in docs/MUTATION.md.
mutation: setup
	$(PY) -c "import mutmut" 2>/dev/null || $(PY) -m pip install -q "mutmut==3.8.1"
	$(PY) scripts/mutation.py $(ARGS)

bench: setup
	$(PY) bench/ops.py
	$(PY) bench/train_step.py

clean:
	rm -rf build build-cmake tpx_ext/_C*.so *.egg-info $(STAMPS)
