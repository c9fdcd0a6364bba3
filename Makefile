# The two commands a newcomer needs: `make demo` (the worker against a flaky demo provider)
# and `make test` (ruff, mypy --strict, pytest on the real RabbitMQ and PostgreSQL).
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test services lint bench

$(BIN)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

services:
	bash .ci/services

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint services
	$(BIN)/pytest -q

demo: $(BIN)/.installed services
	$(BIN)/python -m worker.tooling.demo

# the peers (Dramatiq, Celery) and py-spy: the optional extra 'bench'
$(BIN)/.bench-installed: $(BIN)/.installed
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $@

bench: $(BIN)/.bench-installed services
	$(BIN)/python -m bench
