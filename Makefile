# `make demo` and `make test` do all set-up on a fresh machine: they create .venv when missing
# and install the project into it (with the dev extras), then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= market1501_mini
DEMO_OUT ?= runs/demo

.PHONY: install demo test docs bench bench-eval bench-dgnet bench-crgan bench-masks bench-serve bench-generate bench-loader clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/reidgen demo --data $(DATA) --out $(DEMO_OUT)

test: install
	$(BIN)/ruff check .
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# The documentation site (mkdocs.yml, docs/): the results pages regenerated from bench/results/*.json,
# then built into site/. Offline: no web fonts, no remote inventories.
docs: install
	$(BIN)/python bench/results_pages.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# Benchmarks write JSON to bench/results/; run them on an otherwise idle machine.
bench: bench-eval bench-dgnet bench-crgan bench-masks bench-serve bench-generate bench-loader

bench-eval: install
	$(BIN)/python bench/eval_speed.py

bench-dgnet: install
	$(BIN)/python bench/dgnet_speed.py

bench-crgan: install
	$(BIN)/python bench/crgan_speed.py

bench-masks: install
	$(BIN)/python bench/masks_speed.py

bench-serve: install
	$(BIN)/python bench/serve.py

bench-generate: install
	$(BIN)/python bench/generate.py

bench-loader: install
	$(BIN)/python bench/loader.py

clean:
	rm -rf $(VENV) runs .pytest_cache site

# The Docker deployment, run for real (needs Docker and Docker Compose v2.24+; docker/README.md).
# Not part of `make test`: CI has no Docker engine. local-base: the Debian base image for machines
# without a registry (root, debootstrap); compose-e2e: docker/e2e.sh, the whole stack end to end.
.PHONY: local-base compose-e2e

local-base:
	docker/local-base.sh

# The CPU run builds the local base first when it is missing (E2E_GPU=1: the CUDA base instead).
compose-e2e:
	if [ "$${E2E_GPU:-0}" != 1 ] && ! docker image inspect $${LOCAL_BASE_IMAGE:-reidgen-base:bookworm} >/dev/null 2>&1; then \
	    docker/local-base.sh $${LOCAL_BASE_IMAGE:-reidgen-base:bookworm}; fi
	docker/e2e.sh
