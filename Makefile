# Two entry points: `make demo` and `make test`. Each sets up its venvs on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The suite also runs on torch 2.11 (see constraints-torch211.txt), without vLLM: vLLM 0.32 is
# built against torch 2.13, and its tests skip there saying so.
VENV211 := .venv-torch211
PY211 := $(VENV211)/bin/python
NPROC ?= 2

.PHONY: demo test lint setup clean

$(VENV)/.ready: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0 numpy -c constraints.txt
	$(PY) -m pip install --quiet -e '.[test]' -c constraints.txt
	touch $@

$(VENV)/.vllm-ready: $(VENV)/.ready requirements-vllm.txt
	# vLLM for tests/test_vllm_adapter.py: its pure-Python imports, then vLLM without its CUDA
	# dependencies. 0.32.0 is the newest vLLM built against torch 2.13.0.
	$(PY) -m pip install --quiet -r requirements-vllm.txt -c constraints.txt
	$(PY) -m pip install --quiet --no-deps vllm==0.32.0 -c constraints.txt
	touch $@

$(VENV211)/.torch-ready: constraints-torch211.txt
	test -x $(PY211) || $(PYTHON) -m venv $(VENV211)
	$(PY211) -m pip install --quiet --upgrade pip
	$(PY211) -m pip install --quiet torch==2.11.0 numpy -c constraints-torch211.txt
	touch $@

# After .venv's editable install (under `make -j` the two must not build in the checkout at once).
$(VENV211)/.ready: $(VENV211)/.torch-ready $(VENV)/.ready pyproject.toml
	$(PY211) -m pip install --quiet -e '.[test]' -c constraints-torch211.txt
	touch $@

setup: $(VENV)/.ready

demo: $(VENV)/.ready
	$(VENV)/bin/torchrun --standalone --nproc-per-node $(NPROC) examples/tp_llama.py

# What CI checks before the tests (.ci/run): ruff's lint and format, configured in pyproject.toml.
lint: $(VENV)/.ready
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The whole suite on torch 2.13 (with vLLM: tests/conftest.py runs its tests in a process of
# their own), then on torch 2.11; fails if either fails.
test: $(VENV)/.ready $(VENV)/.vllm-ready $(VENV211)/.ready
	status=0; \
	echo "== torch 2.13 ($(VENV))"; $(PY) -m pytest -q tests || status=1; \
	echo "== torch 2.11 ($(VENV211))"; $(PY211) -m pytest -q tests || status=1; \
	exit $$status

clean:
	rm -rf $(VENV) $(VENV211)
