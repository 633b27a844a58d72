# kiln — the two quickstart commands are `make demo` and `make test`; both set up .venv themselves.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is pinned: an open range would pull a multi-GB CUDA build. 2.13.0 is a small CPU wheel; the tests need
# torchvision, whose matching release is torch 2.14.1.
TORCH_DEMO ?= torch==2.13.0
TORCH_TEST ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: demo test setup-demo setup-test lint typecheck gpu-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

setup-demo: $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_DEMO)
	$(BIN)/python -m pip install -q -e '.[demo]'

setup-test: $(BIN)/python
	$(BIN)/python -c "import torchvision" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_TEST)
	$(BIN)/python -m pip install -q -e '.[test,dev]'

## The main job on the bundled default: import EfficientNet-Lite0, run it on a photo, compare with onnxruntime.
demo: setup-demo
	$(BIN)/kiln demo

## Every CPU test, the ONNX conformance suite and the real-model e2e tests included (this is what CI runs).
test: setup-test
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/python -m pytest -n 2 -q -p no:cacheprovider $(PYTEST_ARGS) tests

lint: setup-test
	$(BIN)/ruff check src tests benchmarks

typecheck: setup-test
	$(BIN)/mypy

## The GPU tier (needs an NVIDIA GPU).
gpu-test:
	PYTHONPATH=src python3 -m pytest -q -m gpu tests

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache .mypy_cache
