"""Screening for a model that is not the bundled MNIST one, the whole path as a user walks it: sklearn's 8x8 digits
exported, a small CNN trained on them through the CLI (with its card), then over real HTTP through uvicorn: a
detector trained on an uploaded labelled .npz by the job API, its report read, a screen refused before it is
activated, the candidate activated with an admin key, and digits screened by the new detector."""

from __future__ import annotations

import io
import json
import time
import zipfile

import httpx
import numpy as np
import pytest
from test_e2e import start_server, stop_server

from service.cli import main as cli_main
from service.data.datasets import DatasetLimits, read_labelled, split
from service.data.sources import write_npz

ADMIN = "byom-admin-key-51c2"
MODEL = "digits-cnn"


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    """The digits split once (60% for the model, 40% held out for the detector), and the model trained on its part
    through `fisher-guard train-model`; returns (models folder, detector data)."""
    work = tmp_path_factory.mktemp("byom")
    assert cli_main(["export-dataset", "sklearn-digits", "--out", str(work / "digits.npz")]) == 0
    data = read_labelled(work / "digits.npz", name="digits.npz", shape=None, num_classes=None,
                         limits=DatasetLimits())
    model_part, detector_part = split(data, 0.4, 0)
    write_npz(model_part, work / "model-data.npz")
    models = work / "models"
    assert cli_main(["train-model", "--dataset", str(work / "model-data.npz"), "--architecture", "small-cnn",
                     "--name", MODEL, "--epochs", "20", "--out", str(models), "--no-progress"]) == 0
    card = json.loads((models / f"{MODEL}.json").read_text())
    assert card["input_shape"] == [1, 8, 8] and card["num_classes"] == 10 and card["test_accuracy"] > 0.85
    return models, detector_part


def test_a_detector_for_the_users_model_is_trained_activated_and_screens(digits_model, tmp_path):
    models, detector_part = digits_model
    upload = io.BytesIO()
    np.savez_compressed(upload, images=detector_part.images, labels=detector_part.labels)
    base, process = start_server(models, tmp_path / "server.log", FISHER_GUARD_SERVE_MODELS=MODEL,
                                 FISHER_GUARD_ADMIN_API_KEYS=ADMIN, FISHER_GUARD_DETECTOR_POLL_S="0.5")
    auth = {"Authorization": f"Bearer {ADMIN}"}
    digit = detector_part.images[:4]
    try:
        with httpx.Client(base_url=base, headers=auth, timeout=60) as http:
            shown = http.get(f"/v1/models/{MODEL}").json()
            assert shown["detector"] is None and shown["input_shape"] == [1, 8, 8]
            refused = http.post(f"/v1/models/{MODEL}/screen", json={"tensor": digit.tolist()})
            assert refused.status_code in (404, 409) and "detector" in refused.json()["detail"]

            params = {"attacks": ["fgm", "bim", "ossa"], "test_fraction": 0.3, "fit_limit": 400}
            submitted = http.post("/v1/jobs", data={"type": "train-detector", "model": MODEL,
                                                   "params": json.dumps(params)},
                                  files={"files": ("digits.npz", upload.getvalue(), "application/octet-stream")})
            assert submitted.status_code == 202, submitted.text
            job = submitted.json()
            deadline = time.monotonic() + 900
            while (status := http.get(job["status_url"]).json())["status"] not in ("succeeded", "failed",
                                                                                   "cancelled"):
                assert time.monotonic() < deadline and process.poll() is None, status
                time.sleep(0.5)
            assert status["status"] == "succeeded", status
            summary = http.get(job["result_url"]).json()["summary"]
            assert summary["feature_set"] in summary["feature_selection"]["candidates"]
            assert "spectral+noise+fine+squeeze" in summary["feature_selection"]["candidates"]  # one channel
            assert set(summary["budgets"]) == {"fgm", "bim", "ossa"}
            assert summary["budgets"]["fgm"] < 3.0  # an 8x8 image's budget, not MNIST's
            assert summary["test"]["auc"] > 0.9 and summary["test"]["clean_fpr"] <= 0.15
            with zipfile.ZipFile(io.BytesIO(http.get(status["artifact_url"]).content)) as zf:
                report = zf.read("report/report.md").decode()
                assert summary["candidate"] in zf.namelist() and "report/roc.png" in zf.namelist()
            assert MODEL in report and "ossa" in report.lower()

            activated = http.post(f"/v1/models/{MODEL}/detector", json={"candidate": summary["candidate"]})
            assert activated.status_code == 200, activated.text
            detector_id = activated.json()["detector"]["id"]
            screened = http.post(f"/v1/models/{MODEL}/screen", json={"tensor": digit.tolist()})
            assert screened.status_code == 200, screened.text
            body = screened.json()
            assert body["detector_id"] == detector_id and len(body["results"]) == 4
            assert sum(r["prediction"] == int(y) for r, y in zip(body["results"], detector_part.labels[:4],
                                                                 strict=True)) >= 3
            listed = http.get("/v1/models").json()["models"][0]["detector"]
            assert listed["id"] == detector_id and listed["activated_at"] and listed["auc"] > 0.9
    finally:
        stop_server(process)
