# Two commands work on a fresh machine (Python 3.11+ and pip): `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test soak lint bench run clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)  ## install, then run the daemon on the bundled demo calendar
	$(BIN)/visitwatch demo

test: $(STAMP)  ## install, then run the whole test suite
	$(BIN)/python -m pytest

soak: $(STAMP)  ## the long runs: thousands of property examples, long crash storms
	VISITWATCH_SOAK=1 $(BIN)/python -m pytest -m soak

lint: $(STAMP)  ## ruff, then a type check of the package (pyproject's [tool.mypy])
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP)  ## print the benchmark figures (see bench/README.md)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .visitwatch-demo .pytest_cache *.egg-info
