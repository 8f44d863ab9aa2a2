# The single source of how to set up, test, benchmark and demo tunelab.
# Two commands on a fresh machine: `make demo` and `make test`.

VENV        ?= .venv
PYTHON      ?= python3
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
TORCH       ?= torch==2.13.0
# A bare `torch` requirement pulls a multi-GB CUDA build; install the pinned CPU wheel first.
# Set TORCH_INDEX=https://download.pytorch.org/whl/cpu where that index is reachable.
TORCH_INDEX ?=
PYTEST_ARGS ?=

.PHONY: setup chromium demo test test-all lint format bench bench-gpu clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(PIP) install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/tunelab assets fetch smollm2-135m-instruct rotten-tomatoes
	$(VENV)/bin/tunelab demo

# The HTML report test renders in headless Chromium (Debian's package). Installed when missing and
# we may (root with apt); otherwise that one test skips with a message saying so.
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && (apt-get install -y -qq chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)) \
	  || echo "note: chromium not installed; the HTML render test will skip"; }

# Default run: CPU only, without `slow` tests (real assets, long runs). CI runs this.
test: setup chromium
	$(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: setup chromium
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: setup
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

bench: setup
	$(PY) benchmarks/data_audit.py
	$(PY) benchmarks/serve_load.py

# On a CUDA machine (see benchmarks/RESULTS.md): the contender table of issue 8, then the memory plan check.
bench-gpu: setup
	$(PY) benchmarks/gpu_sft.py
	$(PY) benchmarks/gpu_sft.py --plan-check

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
