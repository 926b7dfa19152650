# Two commands set everything up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TOOLS := .tools
AZURITE := $(TOOLS)/node_modules/.bin/azurite-blob

.PHONY: install system-deps tools demo test test-fast bench lint typecheck clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# Azurite (Azure Blob emulator) from npm, into a project-local folder.
$(AZURITE):
	mkdir -p $(TOOLS)
	cd $(TOOLS) && npm install --silent --no-audit --no-fund --prefix . azurite@3 >/dev/null

# Debian packages the tests run against: xxh128sum (independent hashes), Slurm 22.05 and
# munge (the burst-buffer E2E test), lua5.1 (the burst_buffer.lua unit tests, the same Lua
# as Slurm's), systemd-analyze (unit files), prometheus + promtool (the real-Prometheus
# test, alert rules), chromium (the dashboard's browser test, driven by Playwright through
# /usr/bin/chromium; never `playwright install`). Needs root, as on CI machines.
SYSTEM_DEPS := xxh128sum:xxhash slurmctld:slurm-wlm munged:munge lua5.1:lua5.1 \
	systemd-analyze:systemd prometheus:prometheus promtool:prometheus chromium:chromium \
	fc-list:fonts-dejavu-core
system-deps:
	@missing=""; for dep in $(SYSTEM_DEPS); do \
	  PATH="$$PATH:/usr/sbin" command -v $${dep%%:*} >/dev/null || missing="$$missing $${dep#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

tools: $(AZURITE) system-deps

demo: install
	$(VENV)/bin/datasync --version >/dev/null
	bash scripts/demo.sh

# Every test, real emulators and PostgreSQL included. Under CI=true a skip is a failure.
test: install tools
	PATH="$(CURDIR)/$(TOOLS)/node_modules/.bin:$$PATH" $(PY) -m pytest -q -p no:cacheprovider tests --ignore=tests/bench

test-fast: install
	$(PY) -m pytest -q -x tests/unit

# Long benchmarks against real peers (xxh128sum, rclone, cp). Results go to docs/benchmarks.md.
bench: install tools
	@command -v xxh128sum >/dev/null && command -v rclone >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq xxhash rclone >/dev/null)
	PATH="$(CURDIR)/$(TOOLS)/node_modules/.bin:$$PATH" $(PY) -m pytest -q -s -p no:cacheprovider tests/bench
	$(PY) scripts/collect_bench.py

lint: install
	$(VENV)/bin/ruff check datasync tests
	$(VENV)/bin/ruff format --check datasync tests

typecheck: install
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) $(TOOLS) demo-data .bench
