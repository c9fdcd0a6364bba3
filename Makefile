# The two commands a newcomer needs: `make demo` (the worker against a flaky demo provider)
# and `make test` (ruff, mypy --strict, deptry, pytest on the real RabbitMQ and PostgreSQL).
# Both need a local RabbitMQ and PostgreSQL (`make services` starts them if installed).
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test services lint bench lock

# The venv is installed from the hashed lock file (the same pins as the image's
# requirements.lock), then the project itself without dependencies.
$(BIN)/.installed: pyproject.toml requirements-dev.lock
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes -r requirements-dev.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

# Refresh both lock files from pyproject.toml: every package to its newest release within
# pyproject's ranges (`make lock LOCK_ARGS=--upgrade-package=aiohttp` for one, `LOCK_ARGS=`
# to only re-resolve after editing pyproject.toml). PyPI only: local pip configuration (mirrors,
# find-links) is ignored so that the hashes are those of PyPI's files for every platform.
LOCK_ARGS ?= --upgrade
PIP_COMPILE := CUSTOM_COMPILE_COMMAND="make lock" PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= $(BIN)/pip-compile --quiet \
	--generate-hashes --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links
lock: $(BIN)/.installed
	$(PIP_COMPILE) $(LOCK_ARGS) --output-file requirements.lock pyproject.toml
	$(PIP_COMPILE) $(LOCK_ARGS) --extra dev --constraint requirements.lock \
		--output-file requirements-dev.lock pyproject.toml

services:
	bash .ci/services

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/deptry .

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
