# Every target sets itself up: a fresh clone needs nothing installed by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)
CONFIG ?=

.PHONY: run-node run-relay demo test lint bench clean install

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

## Run a node; its config is created in the user config dir on first start (or CONFIG=path).
run-node: $(STAMP)
	$(BIN)/meshnet node $(if $(CONFIG),--config $(CONFIG))

## Run the example relay (configs/relay.toml).
run-relay: $(STAMP)
	$(BIN)/meshnet relay --config $(or $(CONFIG),configs/relay.toml)

## A relay, two nodes and a few relayed jobs, all from configs/; stops everything after.
demo: $(STAMP)
	$(BIN)/python -m meshnet.demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## MeshNet against baselines run in the same process tree; figures also to $(BENCH_JSON).
BENCH_JSON ?= bench-results.json
bench: $(STAMP)
	BENCH_JSON=$(BENCH_JSON) $(BIN)/python -m bench.run

lint: $(STAMP)
	$(BIN)/ruff check meshnet actors relay_server tests bench

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
