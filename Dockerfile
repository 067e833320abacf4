# fisher-guard: one image for the API (`serve`, the default) and the workers (`worker`).
# The pinned torch wheels are the CUDA builds: the image uses a GPU when the host gives it one
# (NVIDIA driver + container toolkit) and runs on the CPU otherwise.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, from the lock file: this layer stays cached until requirements.lock changes.
COPY requirements.lock ./
RUN pip install -r requirements.lock

# Then the code and the models that ship with it.
COPY pyproject.toml README.md ./
COPY service ./service
COPY models ./models
RUN pip install --no-deps -e . \
    && useradd --uid 10001 --create-home --shell /usr/sbin/nologin fisher \
    && mkdir -p /data/models /data/jobs \
    && chown -R fisher:fisher /data

USER fisher

ENV FISHER_GUARD_MODELS_DIR=/app/models \
    FISHER_GUARD_USER_MODELS_DIR=/data/models \
    FISHER_GUARD_HOST=0.0.0.0 \
    FISHER_GUARD_PORT=8000

EXPOSE 8000

# Liveness of the API; the worker service in docker-compose.yml replaces this check with its own.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health/live', timeout=4)"]

ENTRYPOINT ["fisher-guard"]
CMD ["serve"]
