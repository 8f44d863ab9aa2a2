# The single source of how to set up, test, benchmark and demo tunelab.
# Two commands on a fresh machine: `make demo` and `make test`.

VENV        ?= .venv
PYTHON      ?= python3
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
# Exact versions of every dependency (pip constraints), what CI last passed with; see `make lock`.
LOCK        := requirements/lock.txt
TORCH       ?= $(shell sed -n 's/^\(torch==[^ ]*\).*/\1/p' $(LOCK))
# A bare `torch` requirement pulls a multi-GB CUDA build; install the locked torch alone first (its own
# dependencies come with the rest, under the lock). Set TORCH_INDEX=https://download.pytorch.org/whl/cpu
# where that index is reachable.
TORCH_INDEX ?=
PYTEST_ARGS ?=
# tunelab's cache (assets, converted models, llama.cpp); the Python code reads the same TUNELAB_HOME
TUNELAB_HOME ?= $(HOME)/.cache/tunelab
LLAMA_CPP_VERSION := 0.3.36
TMPDIR_SHOTS := $(or $(TMPDIR),/tmp)/tunelab-studio-shots
LLAMA_SDIST := $(TUNELAB_HOME)/sdist/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz

.PHONY: setup lock gguf chromium golang demo test test-all lint format bench bench-cpu bench-gpu clean studio-shots

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q --no-deps $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(PIP) install -q -c $(LOCK) -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# Update the lock on purpose: pip resolves pyproject's ranges afresh (the newest versions they allow,
# torch as $(TORCH): `make lock TORCH=torch==X` moves it) and installs nothing; requirements/lock.py
# writes the exact versions. Then run `make test`, and commit the new lock only with that passing run.
lock:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --dry-run --ignore-installed --report $(LOCK).report.json \
	  $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) --find-links $(TUNELAB_HOME)/wheels \
	  "$(TORCH)" -e ".[dev,gguf,qlora,rl]"
	$(PY) requirements/lock.py $(LOCK).report.json $(LOCK)
	rm -f $(LOCK).report.json

# GGUF export/eval run llama.cpp through llama-cpp-python, which has no wheel for this platform on PyPI:
# download its sdist once (it also vendors llama.cpp's converter, which tunelab extracts from it), build
# the wheel from it with portable CPU flags (no -march=native, no AVX-512/AMX: a VM may advertise
# instructions it does not execute) once per build key into $(TUNELAB_HOME)/wheels/<key>/ (the key:
# version, sdist sha256, flags, compiler, arch, Python, the CPU features the flags need), install that exact
# wheel, then the `gguf` extra. Last, a child process proves the library runs on this CPU (one line; a CPU
# where it cannot run gets the refusal line here and in every llama.cpp test's skip reason).
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
  -DGGML_AMX_BF16=OFF -DGGML_CPU_ALL_VARIANTS=OFF -DGGML_BACKEND_DL=OFF
gguf: $(VENV)/.installed
	test -f $(LLAMA_SDIST) || $(PIP) download -q --no-deps --no-binary :all: \
	  "llama-cpp-python==$(LLAMA_CPP_VERSION)" -d $(TUNELAB_HOME)/sdist
	$(PY) src/tunelab/models/llamacpp_build.py --sdist $(LLAMA_SDIST) --wheels $(TUNELAB_HOME)/wheels \
	  --cmake-args "$(LLAMA_CMAKE_ARGS)" --install
	test $(VENV)/.gguf -nt pyproject.toml -a $(VENV)/.gguf -nt $(LOCK) || { \
	  $(PIP) install -q -c $(LOCK) --only-binary llama-cpp-python -e ".[dev,gguf]" && touch $(VENV)/.gguf; }
	-$(PY) -m tunelab.models.llamacpp_probe

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
