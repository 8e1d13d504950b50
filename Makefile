# The two commands of the README. Each sets up .venv on first use (scripts/setup_env.sh).
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast lint
setup:
	@bash scripts/setup_env.sh

demo: setup
	$(PY) -m threadweaver_verl demo $(ARGS)

test: lint
	$(PY) -m pytest -q -ra $(ARGS)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(ARGS)
