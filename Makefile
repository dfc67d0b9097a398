# Two commands set everything up on a fresh machine:
#   make demo   creates .venv, installs videoxl, runs the tiny end-to-end job on ONNX Runtime (CPU)
#   make test   creates .venv, installs with the test extras, runs the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.demo-installed: pyproject.toml | $(BIN)/python
	$(PIP) -e '.[cpu,export]'
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(PIP) -e '.[cpu,export,test,serve,tensorrt,cuda]'
	$(BIN)/python -m videoxl.engines.trt_install
	touch $@

demo: $(VENV)/.demo-installed
	$(BIN)/videoxl demo --workdir artifacts/demo

test: $(VENV)/.test-installed
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(VENV)/.test-installed
	$(BIN)/python bench/run_cpu.py

clean:
	rm -rf $(VENV) artifacts build *.egg-info
