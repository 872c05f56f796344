# Developer entry points. Every target builds .venv first when it is missing or older than
# pyproject.toml (the stamp file), so `make demo` and `make test` work on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# On a CPU-only box install the CPU wheel of torch first; GPU users override TORCH_SPEC
# (e.g. `make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`).
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo demo-weights test test-fast lint format bench bench-gpu clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	@echo "installing the project into $(VENV) (torch: $(TORCH_SPEC)); a few minutes, once"
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The demo: synthetic worlds -> encode -> fine-tune -> evaluate -> serve (DEMO_FAST=1: a reduced run).
demo: $(STAMP)
	$(PY) jobs/demo.py $(DEMO_ARGS)

# Re-train the committed demo weights (models/demo) from scratch: VAE, backbone, Astra adapter.
demo-weights: $(STAMP)
	$(PY) jobs/demo.py --weights $(DEMO_ARGS)

# The README's test command. pytest exits 5 when nothing was collected: that is a failure here too.
test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not ray" $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# The CPU benchmarks, each printing its ratio last; bench/gpu.py too when torch sees a CUDA device.
bench: $(STAMP)
	$(PY) bench/encode.py
	$(PY) bench/store.py
	$(PY) bench/train.py
	$(PY) bench/serve.py
	@if $(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		$(MAKE) --no-print-directory bench-gpu; \
	else \
		echo "bench/gpu.py skipped: torch.cuda.is_available() is False (run make bench-gpu on a GPU box)"; \
	fi

# wan2.1-1.3b at 480x832 on one CUDA GPU (random bf16 weights); the numbers also go to $(GPU_JSON).
GPU_JSON ?= out/bench/gpu.json
bench-gpu: $(STAMP)
	$(PY) bench/gpu.py --json $(GPU_JSON) $(GPU_BENCH_ARGS)

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
