# Two commands matter: `make repro` (pipeline on the bundled data) and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 3000
STAMP := $(VENV)/.installed

# No network here but the package registries: keep every tool's telemetry off.
export DVC_NO_ANALYTICS := 1
export BENTOML_DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export GX_ANALYTICS_ENABLED := false
# MkDocs 1.x prints a banner about its successor on every build; the build log keeps findings.
export NO_MKDOCS_2_WARNING := 1
# The BentoML model store lives inside the repository (ignored by git).
export BENTOML_HOME := $(CURDIR)/.bentoml
# dvc.yaml's `python -m stages.<name>` must find the project's interpreter.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup repro test lint docs serve flow grocery clean

setup: $(STAMP)

# Re-installs only when pyproject.toml changes, so `make setup` takes seconds otherwise.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

repro: setup
	$(BIN)/dvc repro

# The quality gates first (seconds), then the documentation site, then the tests.
test: lint docs
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy vitrine stages service pipeline

# The documentation site into site/ (open site/index.html). Strict: a broken link or anchor, or
# a page outside the nav, fails it; its reference pages are generated from params.yaml, dvc.yaml
# and the source at build time (docs/hooks/generated.py), so they cannot drift from the code.
# NO_MKDOCS_2_WARNING: the pinned MkDocs 1.6 otherwise prints a banner about its successor.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# The review page (/review) needs VITRINE_REVIEW_TOKEN in the environment; the project folder
# lets it show dedupe's training photos and write data/review/decisions.csv.
serve: setup
	VITRINE_PROJECT_DIR=$(CURDIR) $(BIN)/bentoml serve service.service:Classifier --host 127.0.0.1 --port $(PORT)

flow: setup
	$(BIN)/python -m pipeline.flows

# The pipeline on GroceryStore in build/grocery (docs/how-to/grocery.md): GROCERY_TAR names the
# tar (default ../shared/datasets/grocery-store.tar); STAGES=prepare stops after prepare;
# PROFILE=gpu adds configs/grocery-gpu.yaml's settings (a GPU machine).
grocery: setup
	$(BIN)/python -m scripts.grocery $(if $(PROFILE),--profile $(PROFILE)) $(STAGES)

clean:
	rm -rf data/collected data/deduped data/prepared models reports .bentoml site
