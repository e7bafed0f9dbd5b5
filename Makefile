# One command to a running demo, one to a passing test suite (see README.md).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; on a CUDA machine use e.g. `make TORCH=torch demo`.
TORCH ?= torch==2.13.0
# Options for the demo or the call, e.g. `make demo ARGS="--port 9000"` (see `.venv/bin/telepresence demo --help`).
ARGS ?=
# The suite runs its files on this many processes (pytest-xdist): most of its time is spent waiting on the
# pipelines, browsers and servers it starts, so two share 2 cores well (15-17 min -> 6-7.5 on a 2-core machine).
TEST_WORKERS ?= 2
STAMP := $(VENV)/.installed
# (PYTHONWARNINGS below: setuptools warns about editable installs of a flat layout, noise to a newcomer)

.PHONY: install demo serve test clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	PYTHONWARNINGS=ignore::UserWarning $(BIN)/python -m pip install -q -e ".[all]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/telepresence demo $(ARGS)

serve: $(STAMP)
	$(BIN)/telepresence serve $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) .pytest_cache
