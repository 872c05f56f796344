# Developer entry points. `make install` builds .venv; every other target uses it.
VENV ?= .venv
PY := $(VENV)/bin/python
# On a CPU-only box install the CPU wheel of torch first; GPU users override TORCH_SPEC
# (e.g. `make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`).
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install test test-fast lint format bench clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

install: $(PY)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"

# The README's test command. pytest exits 5 when nothing was collected: that is a failure here too.
test:
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast:
	$(PY) -m pytest -q -m "not slow and not ray" $(PYTEST_ARGS)

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench:
	$(PY) bench/encode.py
	$(PY) bench/store.py
	$(PY) bench/train.py
	$(PY) bench/serve.py

format:
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
