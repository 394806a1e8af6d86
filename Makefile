# The two commands a new user needs: `make demo` and `make test`.
# Both create .venv and install what they need; nothing else must be set up by hand.
# System programs (Debian packages, installed as root, or the command to run is printed):
# `make demo` needs Mosquitto; `make test` needs Mosquitto and Chromium.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev
BENCH  := $(VENV)/.installed-bench

.PHONY: demo test lint bench install clean

DEMO   := $(VENV)/.installed-demo

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "edgefleet needs Python 3.10 or newer")'
	@$(PYTHON) -m venv $(VENV) || { \
	  echo "could not create $(VENV): on Debian/Ubuntu run: apt-get install -y python3-venv"; exit 1; }
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip

# the demo runs the packager, the agent and the server: edgefleet[all], no test tools
$(DEMO): pyproject.toml | $(BIN)/python
	@echo "installing edgefleet (agent, packager, server) into $(VENV) (first run takes a minute)"
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[all]'
	@touch $@

# the tests also need the test tools and the gradient-boosting libraries: edgefleet[dev]
$(STAMP): pyproject.toml | $(BIN)/python
	@echo "installing edgefleet and the test tools into $(VENV) (first run takes a few minutes)"
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@ $(DEMO)

$(BENCH): $(STAMP)
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[bench]'
	@touch $@

install: $(STAMP)

demo: $(DEMO)
	@bash scripts/ensure-system-packages mosquitto
	$(BIN)/python -m demo

test: $(STAMP)
	@bash scripts/ensure-system-packages mosquitto chromium postgresql
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(BENCH)
	@bash scripts/ensure-system-packages mosquitto
	$(BIN)/python benchmarks/packager.py
	$(BIN)/python benchmarks/agent.py
	$(BIN)/python benchmarks/server.py
	$(BIN)/python benchmarks/fleet_sim.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache .ruff_cache
