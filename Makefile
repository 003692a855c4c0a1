# Every target sets up .venv itself when it is missing or stale, and is safe to rerun.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mlc-installed
DATA   ?= examples/comp5329-mini
RUN    ?= runs/demo

.PHONY: setup demo test test-slow test-all lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

## make demo: the main job end to end on the real sample shipped in examples/
demo: setup
	$(BIN)/mlc run $(DATA) --preset offline --out $(RUN)

## make test: ruff, then the fast test suite (everything but the tests marked slow)
test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow"

## make test-slow: only the slow tests (real subprocesses killed mid-run, torchrun with 2 processes)
test-slow: setup
	$(BIN)/python -m pytest -q -m slow

## make test-all: ruff and every test (CI runs `make test` then `make test-slow`)
test-all: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python bench/extract.py
	$(BIN)/python bench/fit_head.py

clean:
	rm -rf cache/*/ runs/demo
