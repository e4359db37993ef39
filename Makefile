# Two entry points a newcomer needs: `make run` and `make test`. Both set everything up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test lint typecheck unit bench soak schemas system-deps venv clean

system-deps:
	@if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ] || ! command -v mosquitto_sub >/dev/null; then \
		echo "installing mosquitto and mosquitto-clients with apt-get"; \
		$(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >/dev/null; \
	fi
	@if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 && ! command -v postgres >/dev/null; then \
		echo "installing PostgreSQL server binaries with apt-get"; \
		$(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	fi

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
		echo "error: the gateway needs Python 3.11 or newer; $(PYTHON) is $$($(PYTHON) -V 2>&1)." \
		     "Install python3.11 (or newer) and run: make $(MAKECMDGOALS) PYTHON=python3.11" >&2; exit 1; }
	@if ! $(PYTHON) -c 'import ensurepip, venv' 2>/dev/null; then \
		echo "installing python3-venv with apt-get (Debian's Python has no venv without it)"; \
		$(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			python3-venv "python$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv" >/dev/null; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

run: system-deps venv
	$(BIN)/gateway dev

lint: venv
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

typecheck: venv
	$(BIN)/mypy

test: system-deps venv lint typecheck
	$(BIN)/pytest -m "not soak"

soak: system-deps venv
	$(BIN)/pytest -m soak

bench: system-deps venv
	$(BIN)/python -m bench                                # saturation: gateway, echo, naive
	$(BIN)/python -m bench --rate 5000 --only gateway,echo   # latency at 5,000 records/s offered

schemas: venv
	$(BIN)/python -m gateway.wireschema   # (re)write schemas/ from the request models

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
