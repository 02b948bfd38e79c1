# The two commands: `make demo` (the main job) and `make test`. Each works on a fresh machine
# with only Python: the virtual environment is created and filled on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: test test-fast lint format install demo

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(INSTALLED)
	@echo "mmalign is installed in $(VENV): run 'source $(VENV)/bin/activate' (or call $(BIN)/mmalign)"

# The main job: demo data, four trainings, evaluation, index + search, runs/demo/REPORT.md.
demo: $(INSTALLED)
	$(BIN)/mmalign demo
	@echo "next: 'source $(VENV)/bin/activate' and the guides' mmalign commands run as written"

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy mmalign

format: $(INSTALLED)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Every test and every docstring example in mmalign/ (testpaths and --doctest-modules in
# pyproject.toml); the tests that launch processes run first.
test: lint
	$(BIN)/pytest -n 2

# The tests that start no process (no `launches` marker) and the docstring examples: < 3 min.
test-fast: $(INSTALLED)
	$(BIN)/pytest -n 2 -m "not launches"

# The installed wheel runs its own demo outside the checkout (also part of `make test`).
.PHONY: wheel-check
wheel-check: $(INSTALLED)
	$(BIN)/pytest -q tests/test_wheel.py
