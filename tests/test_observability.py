"""Structured logs carry request and job ids; workers serve Prometheus metrics."""

from __future__ import annotations

import json
import logging
import socket

import httpx

from service.jobs.metrics import JOB_SECONDS, JOBS, serve_metrics
from service.observability import configure_logging, job_id, request_id


def test_json_log_lines_carry_ids_and_extras(capsys):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    configure_logging("INFO", "json")
    try:
        token, job = request_id.set("req-1"), job_id.set("job-9")
        logging.getLogger("service.test").info("screened %d images", 3, extra={"model": "lenet5"})
        request_id.reset(token)
        job_id.reset(job)
        logging.getLogger("service.test").debug("not shown at INFO")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["message"] == "screened 3 images" and entry["level"] == "INFO"
    assert entry["request_id"] == "req-1" and entry["job_id"] == "job-9" and entry["model"] == "lenet5"


def test_worker_metrics_endpoint():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve_metrics(port)
    JOBS.labels("screen", "succeeded").inc()
    JOB_SECONDS.labels("screen").observe(1.5)
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert 'fisher_guard_worker_jobs_total{outcome="succeeded",type="screen"}' in text
    assert "fisher_guard_worker_job_seconds_bucket" in text
