# fisher-guard: one image for the API (`serve`, the default) and the workers (`worker`).
# The pinned torch wheels are the CUDA builds: the image uses a GPU when the host gives it one
# (NVIDIA driver + container toolkit) and runs on the CPU otherwise.
# The base is an argument with the public default: any image with Python 3.11+ and its venv module serves, e.g. a
# local one made with debootstrap where no registry can be reached (deploy/prove-image.sh, docs/deployment.md).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# A virtual environment of the image's own, first on PATH: the same steps on python:3.11-slim and on a Debian
# base, whose system Python refuses pip installs (PEP 668, externally managed).
RUN python3 -m venv /opt/venv
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Dependencies first, from the lock file: this layer stays cached until requirements.lock changes.
COPY requirements.lock requirements-nodeps.lock ./
RUN pip install -r requirements.lock && pip install --no-deps -r requirements-nodeps.lock

# Then the code, and the models that ship with it. models/ belongs to the service's uid: a train-detector job writes
# its candidate in models/candidates/ and activation writes next to the card. docker-compose.yml mounts a named
# volume there (seeded from this folder on first use), so that the API and the workers share what is activated.
COPY pyproject.toml README.md ./
COPY client ./client
COPY service ./service
COPY --chown=10001:10001 models ./models
RUN pip install --no-deps ./client -e . \
    && useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin fisher \
    && mkdir -p /data/models /data/jobs \
    && chown -R 10001:10001 /data

# By uid, not by name: Kubernetes' runAsNonRoot can then verify it without reading /etc/passwd.
USER 10001:10001

ENV FISHER_GUARD_MODELS_DIR=/app/models \
    FISHER_GUARD_USER_MODELS_DIR=/data/models \
    FISHER_GUARD_HOST=0.0.0.0 \
    FISHER_GUARD_PORT=8000

EXPOSE 8000

# Readiness of the API (models loaded and warmed up, not just a live process); the worker service in
# docker-compose.yml replaces this check with its own.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('FISHER_GUARD_PORT', '8000') + '/health/ready', timeout=4)"]

ENTRYPOINT ["fisher-guard"]
CMD ["serve"]
