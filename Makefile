# Set-up is part of every target: a fresh clone needs only `make serve` or `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install serve worker test test-all lint lock image

$(BIN)/fisher-guard: pyproject.toml client/pyproject.toml requirements.lock requirements-dev.lock requirements-nodeps.lock
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.lock -r requirements-dev.lock
	$(BIN)/pip install -q --no-deps -r requirements-nodeps.lock
	$(BIN)/pip install -q --no-deps -e ./client -e '.[evaluate]'
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
	$(BIN)/ruff check service client tests bench

# requirements.lock: what the package needs with its evaluate extra (the image installs it), at this venv's versions, frozen from a
# scratch venv holding the package alone; requirements-dev.lock: the rest of this venv (ruff, schemathesis, ...).
lock:
	$(BIN)/pip freeze --exclude-editable > .lock-all.txt
	rm -rf .lock-venv && $(PY) -m venv .lock-venv
	.lock-venv/bin/pip install -q -c .lock-all.txt -e ./client -e '.[evaluate]'
	.lock-venv/bin/pip freeze --exclude-editable > requirements.lock
	grep -vxFf requirements.lock .lock-all.txt | grep -vxFf requirements-nodeps.lock > requirements-dev.lock
	rm -rf .lock-venv .lock-all.txt

# The container image (Dockerfile), with docker where a daemon answers, else with buildah (no daemon needed):
#   make image                                    # fisher-guard:latest on python:3.11-slim
#   make image BASE_IMAGE=localhost/fisher-guard-base:bookworm IMAGE_BUILD_FLAGS='--isolation chroot'
#   make image IMAGE_BUILDER='buildah --storage-driver vfs'   # where overlay storage is not available
# deploy/prove-image.sh builds it on a base made with debootstrap and runs it (bench/results/image-build.md).
IMAGE ?= fisher-guard:latest
BASE_IMAGE ?= python:3.11-slim
IMAGE_BUILDER ?= $(shell if docker info >/dev/null 2>&1; then echo docker; elif command -v buildah >/dev/null; then echo buildah; fi)
IMAGE_BUILD_FLAGS ?=
# buildah writes OCI images by default, which have no HEALTHCHECK: the Docker format keeps it
IMAGE_FORMAT_FLAG = $(if $(findstring buildah,$(IMAGE_BUILDER)),--format docker)

image:
	@test -n "$(IMAGE_BUILDER)" || { echo "make image needs a Docker daemon or buildah (apt-get install buildah)"; exit 1; }
	$(IMAGE_BUILDER) build $(IMAGE_FORMAT_FLAG) $(IMAGE_BUILD_FLAGS) --build-arg BASE_IMAGE=$(BASE_IMAGE) -t $(IMAGE) .
