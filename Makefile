# hpa-edge developer commands. `make test` on a fresh Debian/Ubuntu machine creates .venv,
# installs the project with every extra (versions pinned by constraints.txt) and runs
# lint, type checks and the whole test suite.

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-dev
PYTEST_ARGS ?=

.PHONY: test test-unit lint typecheck prereqs venv clean

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
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
