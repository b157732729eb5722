# streamgate: `make help` lists the entry points.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INVENTORY ?= ansible/inventories/lab/hosts.yml
LAB_TOPOLOGY ?= split
LAB_RELEASE ?= bookworm
GATEWAY_PORT ?= 8000
SIM_PORT ?= 8100
# Packages the controller needs (Debian/Ubuntu): local nginx for wire tests, lab hosts.
APT_PACKAGES := nginx-light debootstrap systemd-container iptables iproute2 openssh-client

.PHONY: help deps run test test-service lint lab lab-destroy deploy testinfra demo loadtest bench clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(VENV)/.installed: service/pyproject.toml service/constraints.txt requirements-dev.txt requirements-dev.lock
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c service/constraints.txt -c requirements-dev.lock -e service -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed ## make the virtualenv (service + test tools, pinned)

deps: ## install the controller's system packages (root), or say what is missing
	@if [ "$$(id -u)" = 0 ]; then \
	  missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	  if [ -n "$$missing" ]; then DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi; \
	else \
	  command -v nginx >/dev/null || echo "note: nginx not found: as root, make installs $(APT_PACKAGES); nginx wire tests will skip"; \
	fi

run: venv ## run the simulator and the gateway on loopback (no root), print a curl to try
	$(PY) -m streamgate.devrun --gateway-port $(GATEWAY_PORT) --sim-port $(SIM_PORT)

test-service: venv deps ## service tests: unit, property, wire (real gunicorn, simulator, local nginx)
	$(PY) -m pytest tests/unit tests/wire

test: test-service ## everything CI runs
	@echo "make test: all suites passed"

lint: venv ## ruff
	$(VENV)/bin/ruff check service tests loadtest lab bench

bench: venv deps ## benchmark gateway (direct, via nginx) against the simulator alone
	$(PY) bench/stream_bench.py

clean: ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
