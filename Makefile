# Two set-up commands work on a fresh machine with Python 3.11: `make quickstart` and `make test`.
# They create .venv, install everything (torch first, pinned, so pip never pulls a multi-GB build
# this machine cannot use), then run. GPU users: `make install TORCH_SPEC=torch` (or install their
# CUDA build of torch into the venv first; an installed torch that satisfies torch>=2.4 is kept).

PYTHON     ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP      := $(VENV)/.installed-$(subst =,_,$(subst >,_,$(TORCH_SPEC)))
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install quickstart test test-fast lint data bench bench-data gpu-check gpu-wheels clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

quickstart: install
	$(VENV)/bin/finetune run recipes/quickstart.yaml run.overwrite=true

# Two xdist workers (one torch thread each) on CI's 2 cores, a test file per work unit: the
# quickstart story's module fixture then runs once, on one worker. Files go out in conftest's
# LONGEST_FIRST order (--no-loadscope-reorder: xdist would sort them by their number of tests and
# start the story minutes late): the story first, the rest on the other worker, and when that one
# runs out of files the story takes both cores (conftest.py). (Not loadgroup: xdist 3.8's group
# suffix is lost under pytest 9, so a group's module fixture ran on both workers.)
test: install
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

test-fast: install
	$(PY) -m pytest -q -m "not slow and not gpu"

lint: install
	$(VENV)/bin/ruff check finetune tests

data: install
	$(PY) -m finetune.demo.synth --out data/quickstart

# GPU machine: our SFT path vs TRL's on the issue's shapes, one JSON line per run + a table (docs/benchmarks.md).
BENCH_ARGS ?= --suite issue --shapes qwen0.5b,llama1b --check
bench: install
	$(VENV)/bin/finetune bench $(BENCH_ARGS) --json-out runs/bench.jsonl

# CPU: SFT data preparation of 200k synthetic multi-turn conversations, ours (data.num_proc 2 and 1)
# vs TRL's SFTTrainer._prepare_dataset (dataset_num_proc 1 and 2): conversations/s, CPU time, peak memory.
BENCH_DATA_ARGS ?= --n 200000 --runs finetune:2,finetune:1,trl:1,trl:2
bench-data: install
	$(PY) -m finetune.data.bench_tokenize $(BENCH_DATA_ARGS) --workdir runs/bench-data --json-out runs/bench-data.jsonl

# GPU machine: one table of PASS/FAIL/SKIP lines (attention kernels, packed vs padded, recipe memory vs
# estimate, compile, PPO, pytest -m gpu, bench) written into docs/gpu-check.md; exit 1 on any FAIL.
# `make test` runs the same script with --cpu on tiny shapes (tests/test_gpu_check.py).
gpu-check: install
	$(PY) -m finetune.run.gpu_check

# Wheels for an offline GPU machine whose Python has torch and transformers only (docs/gpu-check.md):
# downloaded here into the ignored .whl/, installed there with pip --no-index.
WHEEL_PY   ?= 3.12
GPU_WHEELS ?= trl==1.16.0 datasets==5.2.0 bitsandbytes==0.50.2 dill==0.3.9 multiprocess==0.70.17 \
              pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
              peft==0.21.2
# DeepSpeed (gpu-check's zero2/zero3 line) is an sdist on PyPI: built here into a pure-Python wheel.
DS_WHEELS  ?= hjson==3.1.0 msgpack==1.2.4 ninja==1.13.2 py-cpuinfo==9.0.0 einops==0.8.2 psutil==7.2.2
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version $(WHEEL_PY) --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
	  --platform any -d .whl $(GPU_WHEELS) $(DS_WHEELS)
	DS_BUILD_OPS=0 $(PYTHON) -m pip wheel -q --no-deps -w .whl "deepspeed==0.19.8"
	@du -sh .whl

clean:
	rm -rf runs .pytest_cache
