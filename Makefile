# Every target sets itself up: a fresh clone needs nothing installed by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)
CONFIG ?=

.PHONY: run-node run-relay demo test lab-tools lab-matrix lab-punch lint bench bench-storm bench-peers fuzz clean install

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

## The NAT lab's programs (tests/lab): iptables and coturn from Debian's packages, installed
## when running as root and missing. Without root the lab tests skip, saying why.
LAB_TOOLS := iptables turnserver
lab-tools:
	@if [ "$$(id -u)" = 0 ] && ! (for t in $(LAB_TOOLS); do command -v $$t || exit 1; done) >/dev/null 2>&1; then \
		echo "installing the NAT lab's tools (iptables, coturn)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			iptables iproute2 coturn >/dev/null; \
	fi

## Lint first (ruff, mypy: a few seconds), then the suite: CI runs exactly this.
test: lint lab-tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## The NAT lab matrix (root): a node of each NAT kind, every pair; prints the path each
## pair ends on and whether its jobs completed.
lab-matrix: $(STAMP) lab-tools
	$(BIN)/python -m tests.lab.matrix

## Hole punches between two port-restricted NATs, one in four with a side up to 2 s late
## (root): how many end direct, and the time from deciding to punch to the first job
## answered on the direct link. LAB_TRIALS sets the count.
LAB_TRIALS ?= 100
lab-punch: $(STAMP) lab-tools
	$(BIN)/python -m tests.lab.punch_trials --trials $(LAB_TRIALS)

## MeshNet against baselines run in the same process tree; figures also to $(BENCH_JSON).
BENCH_JSON ?= bench-results.json
bench: $(STAMP)
	BENCH_JSON=$(BENCH_JSON) $(BIN)/python -m bench.run

## A relay SIGKILLed and restarted under $(STORM_NODES) simulated nodes, with listen backlog 100
## (libzmq's default) and relay.listen_backlog's default; figures also to $(BENCH_STORM_JSON).
STORM_NODES ?= 2000
BENCH_STORM_JSON ?= bench-storm-results.json
bench-storm: $(STAMP)
	BENCH_STORM_JSON=$(BENCH_STORM_JSON) $(BIN)/python -m bench.relay_storm --nodes $(STORM_NODES)

## Fuzz every decoder with $(FUZZ_INPUTS) inputs each (FUZZ_SEED picks the seed); report also to $(FUZZ_JSON).
FUZZ_INPUTS ?= 100000
FUZZ_JSON ?= fuzz-results.json
fuzz: $(STAMP)
	FUZZ_INPUTS=$(FUZZ_INPUTS) FUZZ_JSON=$(FUZZ_JSON) $(BIN)/python -m tests.fuzz

## Optional extra: Ray on this machine against baseline (a) from the same run; Ray lives in its
## own virtualenv ($(PEERS_VENV)), never in $(VENV). Figures also to $(BENCH_PEERS_JSON).
PEERS_VENV := .venv-peers
PEERS_BIN := $(PEERS_VENV)/bin
RAY_VERSION ?= 2.60.0
PEERS_STAMP := $(PEERS_VENV)/.installed-ray$(RAY_VERSION)-$(shell cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)
BENCH_PEERS_JSON ?= bench-peers-results.json

$(PEERS_STAMP): setup.cfg pyproject.toml
	test -x $(PEERS_BIN)/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_BIN)/python -m pip install -q --upgrade pip
	$(PEERS_BIN)/python -m pip install -q -e '.[test]' 'ray==$(RAY_VERSION)'
	rm -f $(PEERS_VENV)/.installed-*
	touch $@

bench-peers: $(PEERS_STAMP)
	BENCH_PEERS_JSON=$(BENCH_PEERS_JSON) $(PEERS_BIN)/python -m bench.peers

## ruff over everything; mypy over meshnet (strict), actors and relay_server (pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check meshnet actors relay_server tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(PEERS_VENV) build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
