# `make demo` and `make test` do all set-up on a fresh machine: they create .venv when missing
# and install the project into it (with the dev extras), then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= market1501_mini
DEMO_OUT ?= runs/demo

.PHONY: install demo test bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/reidgen demo --data $(DATA) --out $(DEMO_OUT)

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/eval_speed.py

clean:
	rm -rf $(VENV) runs .pytest_cache
