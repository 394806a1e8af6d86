# The two commands a new user needs: `make demo` and `make test`.
# Both create .venv and install what they need; nothing else must be set up by hand.
# `make test` also installs Mosquitto (Debian's package, as root) for the integration tests,
# or says exactly what to run when it cannot.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev

.PHONY: demo test lint bench install clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "edgefleet needs Python 3.10 or newer")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { \
	  echo "could not create $(VENV): on Debian/Ubuntu run: apt-get install -y python3-venv"; exit 1; }
	@echo "installing edgefleet and its dependencies into $(VENV) (first run takes a minute)"
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m packager.demo

test: $(STAMP)
	@bash scripts/ensure-mosquitto
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python benchmarks/packager.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache .ruff_cache
