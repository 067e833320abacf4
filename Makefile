# Set-up is part of every target: a fresh clone needs only `make serve` or `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install serve worker test test-all lint lock

$(BIN)/fisher-guard: pyproject.toml requirements.lock requirements-dev.lock
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.lock -r requirements-dev.lock
	$(BIN)/pip install -q --no-deps -e '.[evaluate]'
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

# requirements.lock: what the package needs with its evaluate extra (the image installs it), at this venv's versions, frozen from a
# scratch venv holding the package alone; requirements-dev.lock: the rest of this venv (ruff, schemathesis, ...).
lock:
	$(BIN)/pip freeze --exclude-editable > .lock-all.txt
	rm -rf .lock-venv && $(PY) -m venv .lock-venv
	.lock-venv/bin/pip install -q -c .lock-all.txt -e '.[evaluate]'
	.lock-venv/bin/pip freeze --exclude-editable > requirements.lock
	grep -vxFf requirements.lock .lock-all.txt > requirements-dev.lock
	rm -rf .lock-venv .lock-all.txt
