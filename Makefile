PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint format bench lock clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "rcma needs $(PYTHON) (set PYTHON=/path/to/python3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

DEMO_STORE := demo-out/store.h5

demo: setup
	mkdir -p demo-out
	$(BIN)/rcma extract data/crema-d/mp4 data/pexels data/hamilton --stage faces --visual-model none --store $(DEMO_STORE)
	$(BIN)/rcma status --store $(DEMO_STORE)

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

bench: setup
	$(BIN)/python bench/faces.py

lock:
	$(PYTHON) -m venv /tmp/rcma-lock && /tmp/rcma-lock/bin/pip install --quiet -e '.[dev]' \
	  && { echo "# Exact versions for Python 3.11, resolved from pyproject.toml's pins (make lock regenerates)."; \
	       /tmp/rcma-lock/bin/pip freeze --exclude-editable; } > requirements.lock

clean:
	rm -rf $(VENV) demo-out
