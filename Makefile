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
# tunelab's cache (assets, converted models, llama.cpp); the Python code reads the same TUNELAB_HOME
TUNELAB_HOME ?= $(HOME)/.cache/tunelab
LLAMA_CPP_VERSION := 0.3.36
TMPDIR_SHOTS := $(or $(TMPDIR),/tmp)/tunelab-studio-shots
LLAMA_SDIST := $(TUNELAB_HOME)/sdist/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz

.PHONY: setup gguf chromium golang demo test test-all lint format bench bench-cpu bench-gpu clean studio-shots

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(PIP) install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# GGUF export/eval run llama.cpp through llama-cpp-python, which has no wheel for this platform on PyPI:
# download its sdist once (it also vendors llama.cpp's converter, which tunelab extracts from it),
# build the wheel from it once per machine (cmake, ~10 min on 2 cores) into $(TUNELAB_HOME)/wheels,
# then install it with the `gguf` extra. Later runs and new venvs reuse the cached wheel.
$(VENV)/.gguf: $(VENV)/.installed
	test -f $(LLAMA_SDIST) || $(PIP) download -q --no-deps --no-binary :all: \
	  "llama-cpp-python==$(LLAMA_CPP_VERSION)" -d $(TUNELAB_HOME)/sdist
	ls $(TUNELAB_HOME)/wheels/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || { \
	  start=$$(date +%s); echo "building llama-cpp-python $(LLAMA_CPP_VERSION) once (~10 min)"; \
	  CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) wheel -q --no-deps $(LLAMA_SDIST) -w $(TUNELAB_HOME)/wheels \
	  && echo "built in $$(( $$(date +%s) - start )) s"; }
	$(PIP) install -q --find-links $(TUNELAB_HOME)/wheels --only-binary llama-cpp-python -e ".[dev,gguf]"
	touch $@

gguf: $(VENV)/.gguf

demo: setup
	$(VENV)/bin/tunelab assets fetch smollm2-135m-instruct rotten-tomatoes
	$(VENV)/bin/tunelab demo

# The HTML report test renders in headless Chromium (Debian's package). Installed when missing and
# we may (root with apt); otherwise that one test skips with a message saying so.
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && (apt-get install -y -qq chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)) \
	  || echo "note: chromium not installed; the HTML render test will skip"; }

# The Ollama Modelfile test renders its TEMPLATE with Go's own text/template (Debian's golang-go).
# Installed when missing and we may (root with apt); otherwise that test skips with a message saying so.
golang:
	@command -v go >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && (apt-get install -y -qq golang-go >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq golang-go >/dev/null)) \
	  || echo "note: go not installed; the Ollama Modelfile render test will skip"; }

# Default run: CPU only, without `slow` tests (real assets, long runs). CI runs this, llama.cpp included.
test: setup gguf chromium golang
	$(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: setup gguf chromium golang
	$(PY) -m pytest $(PYTEST_ARGS)

# Screenshots of each studio page at 1280x800, taken by the browser tests, kept in docs/studio/. The tests
# write into a temporary folder (a test session may not change the checkout), copied here after they pass.
studio-shots: setup chromium
	rm -rf $(TMPDIR_SHOTS) && mkdir -p $(TMPDIR_SHOTS) docs/studio
	TUNELAB_STUDIO_SHOTS=$(TMPDIR_SHOTS) $(PY) -m pytest -q tests/test_studio_browser.py tests/test_studio_lifecycle.py
	cp $(TMPDIR_SHOTS)/*.png docs/studio/

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: setup
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

bench: setup
	$(PY) benchmarks/data_audit.py
	$(PY) benchmarks/serve_load.py

# The SFT contender harness on this CPU (SmolLM2-135M shape, a few minutes): TRL default vs tunelab.
bench-cpu: setup
	$(PY) benchmarks/gpu_sft.py --cpu-shape smollm2

# On a CUDA machine (see benchmarks/RESULTS.md): the contender table of issues 8 and 20 (TRL, tunelab
# and each fast-path lever, Unsloth), then the memory plan check, sharing one model directory.
# A lent machine without this venv runs benchmarks/gpu_session.sh instead (carried wheels, logs in $OUT).
bench-gpu: setup
	$(PY) benchmarks/gpu_sft.py --workdir /tmp/gpu_sft-work
	$(PY) benchmarks/gpu_sft.py --plan-check --workdir /tmp/gpu_sft-work

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
