# Lucerna's developer entry points. `make test` is what CI runs (.ci/run) on a fresh machine.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

# uv on PATH, else the one pip installed for python3 (a pyenv shim may not exist yet).
UV = $(shell command -v uv 2>/dev/null || echo python3 -m uv)
# The committed lock is the truth: install exactly it, never rewrite it.
UV_FLAGS = --all-packages $(if $(wildcard uv.lock),--frozen)
RUN = $(UV) run $(UV_FLAGS)
PROTOS = $(shell find protos -name '*.proto')
PROTO_OUT = services/core/src
# Folders git does not keep while empty are left out rather than failing pytest.
TEST_PATHS = $(wildcard tests/unit tests/integration tests/e2e)
MYPY_PACKAGES = services/core/src services/ingestion/src services/metadata/src services/orchestrator/src services/inference/src services/fhir/src services/audit/src
# Training runs in a virtual environment of its own (PyTorch stays out of the services and of make test).
TRAIN_VENV ?= $(HOME)/.cache/lucerna/train-venv
TRAIN_PY = $(TRAIN_VENV)/bin/python
# `make servers-start SERVERS="rabbitmq ferretdb"` picks some; empty means all.
SERVERS ?=

.PHONY: help setup servers-install deps protos lint test up bench train servers-start servers-stop clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

setup: servers-install deps protos ## install the test servers and Python deps, generate protobuf code

servers-install: ## Debian packages, FerretDB, Elasticsearch, the FHIR peer, Fabric (cached in ~/.cache/lucerna)
	bash infra/local/install.sh

deps: ## uv and the workspace's Python packages
	bash infra/local/install.sh uv
	$(UV) sync $(UV_FLAGS)

protos: deps ## generate the Python code for protos/ into services/core/src
	$(RUN) python -m grpc_tools.protoc -I protos --python_out=$(PROTO_OUT) --pyi_out=$(PROTO_OUT) --grpc_python_out=$(PROTO_OUT) $(PROTOS)

lint: protos ## ruff on everything, mypy on the services' packages
	$(RUN) ruff check .
	$(RUN) mypy $(MYPY_PACKAGES)

test: setup lint ## the whole suite: the Go chaincode's and anchor service's tests, then unit, integration (real servers), e2e
	bash infra/fabric/chaincode/test.sh
	bash services/anchor/test.sh
	$(RUN) pytest $(TEST_PATHS)

up: deps protos ## run the whole platform on this machine with embedded defaults (and a local Fabric ledger)
	bash infra/local/install.sh fabric
	$(RUN) lucerna up

bench: deps protos ## benchmarks against their anchor figures (ingestion, search, inference, FHIR, audit)
	$(RUN) python -m tests.bench.run
	$(RUN) python -m tests.bench.inference
	$(RUN) python -m tests.bench.fhir
	$(RUN) python -m tests.bench.audit

train: deps ## train, export (FP32 + INT8) and evaluate the shipped models on CPU (~25 min; see services/inference/training)
	test -x $(TRAIN_PY) || $(UV) venv --python 3.11 $(TRAIN_VENV)
	$(UV) pip install --python $(TRAIN_PY) -r services/inference/training/requirements.txt
	cd services/inference/training && \
	  $(TRAIN_PY) train.py --model detector --variant full --seed 0 --steps 4500 --scans 40 --out runs/detector-full && \
	  $(TRAIN_PY) train.py --model classifier --seed 0 --steps 1500 --batch 32 --scans 160 --out runs/classifier-1500 && \
	  $(TRAIN_PY) export.py --detector runs/detector-full/model.pt --classifier runs/classifier-1500/model.pt \
	    --repo ../../../infra/triton/models --detector-threshold 0.55 && \
	  $(TRAIN_PY) evaluate.py --repo ../../../infra/triton/models --scans 30 --val-scans 10 --head-scans 40 \
	    --rounds 15 --out runs/eval.json

servers-start: servers-install ## start the test servers by hand (data in var/servers)
	python3 infra/local/servers.py start $(SERVERS)

servers-stop: ## stop the servers started by servers-start
	python3 infra/local/servers.py stop $(SERVERS)

clean: servers-stop ## remove generated code, caches and local server data
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
	find $(PROTO_OUT) -name '*_pb2.py' -o -name '*_pb2.pyi' | xargs -r rm -f
	find . -path ./.venv -prune -o -name __pycache__ -type d -print | xargs -r rm -rf
