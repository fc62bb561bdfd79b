# Two commands do all the set-up on a fresh machine with Python 3.11+:
#   make demo   creates .venv, installs the package and trains the embedded default (a small YOCO-U)
#   make test   creates .venv, installs the test extras and runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
TEST_WORKERS ?= 2

.PHONY: demo test install install-test plan clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/python -m experiments.train $(ARGS)

test: install-test
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=15 tests $(ARGS)

plan: install
	$(BIN)/python -m experiments.plan --archs=transformer,yoco,yocou,rins,looped $(ARGS)

clean:
	rm -rf $(VENV) runs *.egg-info
