# Set-up is part of every target: a fresh clone needs only `make serve` or `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install serve worker test test-all lint lock

$(BIN)/fisher-guard: pyproject.toml requirements.lock
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $@

install: $(BIN)/fisher-guard

serve: install
	$(BIN)/fisher-guard serve

worker: install
	$(BIN)/fisher-guard worker

test: install
	@command -v redis-server >/dev/null || { echo "redis-server is needed by the queue tests: apt-get install redis-server"; exit 1; }
	$(BIN)/pytest -q

test-all: install
	$(BIN)/pytest -q -m ""

lint: install
	$(BIN)/ruff check service tests bench

lock:
	$(BIN)/pip freeze --exclude-editable > requirements.lock
