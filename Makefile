# Two commands set everything up on a fresh machine (see README.md):
#   make demo   - compile a small entmax model with our backend and decode (CPU is fine)
#   make test   - the test suite (what CI runs)
# Both create or reuse the virtual environment in $(VENV).

VENV ?= .venv
PY := $(VENV)/bin/python
# On CPU machines torch 2.13.0 is served from local disk; override for other machines,
# e.g. `make test TORCH_SPEC=torch` on a machine with a CUDA torch available.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=15
