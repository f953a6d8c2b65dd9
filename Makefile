# Two entry points: `make demo` and `make test`. Each sets up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
NPROC ?= 2

.PHONY: demo test setup clean

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

setup: $(VENV)/.ready

demo: $(VENV)/.ready
	$(VENV)/bin/torchrun --standalone --nproc-per-node $(NPROC) examples/tp_llama.py

# The vLLM tests import the real vLLM, whose op registrations clash with the stand-ins the
# other tests define: they run in a process of their own.
test: $(VENV)/.ready $(VENV)/.vllm-ready
	$(PY) -m pytest -q tests --ignore=tests/test_vllm_adapter.py
	$(PY) -m pytest -q tests/test_vllm_adapter.py

clean:
	rm -rf $(VENV)
