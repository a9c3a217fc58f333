# fastbptt: `make demo` trains the book's model, `make test` runs the test suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test test-cuda-sim demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest
	$(MAKE) test-cuda-sim

# the CUDA kernels on the numba-cuda simulator (no GPU needed): tiny shapes, single block
test-cuda-sim: install
	NUMBA_ENABLE_CUDASIM=1 $(BIN)/python -m pytest tests/test_cuda.py tests/test_torch_cuda.py

# the book's run (d2l 0.17 §8.5: first 10,000 tokens, H=512, 500 epochs), bounded to ~2 minutes
demo: install
	$(BIN)/fastbptt train --max-chars 10000 --max-minutes 2

# peers: torch's CPU build is pinned so that pip does not pull the CUDA build
bench: install
	$(BIN)/python -m pip install -q "torch==2.13.0" -e ".[peers]"
	$(BIN)/python -m pytest bench --benchmark-enable --benchmark-only

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks .hypothesis
	find . -name __pycache__ -prune -exec rm -rf {} +
