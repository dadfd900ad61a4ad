# `make demo` and `make test` create (or reuse) .venv from the exact pins, then do their job.
PYTHON ?= python3.12
LOCK := requirements/cpu.lock
VENV := .venv
STAMP := $(VENV)/.installed-$(shell sha256sum $(LOCK) setup.py | sha256sum | cut -c1-16)
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# DeepSpeed JIT-builds its CPU comm op once per venv; a shared cache is rebuilt by every checkout.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

.PHONY: venv demo test test-all gpu-check gpu-wheels gpu-check-data clean-venv

venv: $(STAMP)

$(STAMP): $(LOCK) setup.py
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --quiet --upgrade pip==24.3.1
	$(PY) -m pip install --quiet --quiet -r $(LOCK)
	$(PY) -m pip install --quiet --quiet --no-deps --no-build-isolation -e .
	touch $@

demo: venv
	$(VENV)/bin/megajepa demo configs/demo.yaml

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

# Heavier checks (slow, GPU, a one-node Slurm cluster) that `make test` leaves out.
test-all: venv
	$(PY) -m pytest -q -m "slow or gpu or not slow" $(PYTEST_ARGS) tests

# Validate a GPU machine in under 8 minutes (GPU tests, the 1B shape at a 128k vocabulary trained,
# saved and resumed, the bench, the kernel bench): scripts/gpu_check.sh says what each step checks.
gpu-check: venv
	PY=$(PY) scripts/gpu_check.sh

# For a GPU machine without a package registry: the wheels it lacks beside its own torch and
# transformers (.gpu-wheels/), and the check's data (data/gpu-check/), both built here and carried.
gpu-wheels:
	scripts/gpu_wheels.sh

gpu-check-data: venv
	PY=$(PY) scripts/gpu_check.sh --data-only

clean-venv:
	rm -rf $(VENV)
