"""Activating a detector without a restart (service.detect.files.activate_detector / rollback_detector): the files
on disk (content-addressed .npz, the active card naming it, the previous card, unnamed files deleted), refusals
that leave the active detector untouched, the CLI, the admin-only API endpoints, the jobs' model cache, and the
swap under concurrent screening over real HTTP with two uvicorn processes sharing one models folder.

The detectors are cheap: logistic regressions on random features (what is tested is the plumbing), saved with
`save_detector` for the shipped LeNet-5 weights copied into tmp_path."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from api_support import PYTESTMARK, assert_problem, wait_ready
from sklearn.linear_model import LogisticRegression
from support import free_port

from service.cli import main as cli_main
from service.config import REPO_ROOT, Settings, get_settings
from service.detect.detector import Detector
from service.detect.files import (
    FILE_KEY,
    ActivationError,
    DetectorLoadError,
    WeightsMismatchError,
    activate_detector,
    card_path_for,
    detector_id,
    detector_path,
    find_detector,
    load_detector,
    rollback_detector,
    save_detector,
)
from service.jobs import model_cache
from service.zoo.registry import sha256_file

pytestmark = PYTESTMARK

SHIPPED = REPO_ROOT / "models"
MODEL = "lenet5"
SHA = sha256_file(SHIPPED / f"{MODEL}.pt")
KEY, ADMIN = "plain-key-5c1e", "admin-key-9d2b"
WHEN = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


# ---------------------------------------------------------------------------------------------- helpers

def lr_detector(column: int, threshold: float, sha: str = SHA) -> Detector:
    """A logistic regression on random 'plain' features (log10 eigenvalues), deciding on one column."""
    rng = np.random.default_rng(column)
    features = rng.normal(-3, 1, size=(200, 20))
    labels = (features[:, column] > -3).astype(int)
    card = {"kind": "fisher-guard detector", "model": {"name": MODEL, "sha256": sha},
            "test": {"auc": 0.9 + column / 100, "tpr": 0.8, "fpr": 0.05, "clean_fpr": 0.04},
            "threshold": {"value": threshold, "target_fpr": 0.05}}
    return Detector(LogisticRegression().fit(features, labels), "plain", 20, threshold, card)


def candidate(folder: Path, tag: str, column: int, threshold: float, sha: str = SHA) -> Path:
    """A candidate as train-detector writes it: <models>/candidates/<model>.detector.<tag>.npz + card."""
    path, _ = save_detector(lr_detector(column, threshold, sha), folder / "candidates" / f"{MODEL}.detector.{tag}.npz")
    return path


def file_id(path: Path) -> str:
    return detector_id(hashlib.sha256(path.read_bytes()).hexdigest())


def card(path: Path) -> dict:
    return json.loads(path.read_text())


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of the folder (not the lock file) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.endswith(".lock")}


@pytest.fixture
def folder(tmp_path) -> Path:
    """The shipped LeNet-5 (card, weights) with a cheap active detector in the shipped form (a card without
    "file": `lenet5.detector.npz`)."""
    folder = tmp_path / "models"
    folder.mkdir()
    for name in (f"{MODEL}.json", f"{MODEL}.pt"):
        shutil.copy(SHIPPED / name, folder / name)
    save_detector(lr_detector(0, 0.5), detector_path(folder, MODEL))
    return folder


# ------------------------------------------------------------------------------------------ files on disk

def test_activation_rollback_and_reactivation_leave_the_files_as_designed(folder):
    for suffix in (".npz", ".json"):  # the real shipped detector, as it ships: it keeps loading unchanged
        shutil.copy(SHIPPED / f"{MODEL}.detector{suffix}", folder / f"{MODEL}.detector{suffix}")
    shipped_id = file_id(folder / f"{MODEL}.detector.npz")
    shipped_bytes = (folder / f"{MODEL}.detector.npz").read_bytes()
    model_card, active_card = folder / f"{MODEL}.json", folder / f"{MODEL}.detector.json"
    previous_card = folder / f"{MODEL}.detector.previous.json"
    a, b = candidate(folder, "a", 1, 0.3), candidate(folder, "b", 2, 0.7)
    a_id, b_id = file_id(a), file_id(b)
    a_file, b_file = folder / f"{MODEL}.detector.{a_id}.npz", folder / f"{MODEL}.detector.{b_id}.npz"

    active = activate_detector(a, model_card, SHA, now=WHEN)
    assert (active.id, active.file, active.card) == (a_id, a_file, active_card)
    assert (active.previous_id, active.previous_file) == (shipped_id, folder / f"{MODEL}.detector.npz")
    assert active.activated_at == "2025-01-02T03:04:05Z" and active.source == str(a) and active.removed == ()
    assert a_file.read_bytes() == a.read_bytes()  # the content-addressed copy
    now_card = card(active_card)
    assert now_card[FILE_KEY]["file"] == a_file.name and now_card[FILE_KEY]["sha256"].startswith(a_id)
    assert now_card["activation"] == {"activated_at": "2025-01-02T03:04:05Z", "source": str(a),
                                      "previous": {"id": shipped_id, "file": f"{MODEL}.detector.npz"}}
    kept = card(previous_card)  # the shipped card, its file made explicit
    assert kept[FILE_KEY]["file"] == f"{MODEL}.detector.npz" and kept[FILE_KEY]["sha256"].startswith(shipped_id)
    assert (folder / f"{MODEL}.detector.npz").read_bytes() == shipped_bytes
    # what callers load: find_detector's answer, and the old detector_path call sites, both give the active one
    assert find_detector(folder, MODEL) == active_card
    assert load_detector(find_detector(folder, MODEL), SHA).threshold == 0.3
    assert load_detector(detector_path(folder, MODEL), SHA).threshold == 0.3
    assert load_detector(previous_card, SHA).classifier.kind == "random_forest"

    back = rollback_detector(model_card, SHA, now=WHEN)
    assert (back.id, back.file, back.source) == (shipped_id, folder / f"{MODEL}.detector.npz", "rollback")
    assert (back.previous_id, back.previous_file) == (a_id, a_file) and a_file.is_file()  # kept: a card names it
    assert card(active_card)["activation"]["previous"] == {"id": a_id, "file": a_file.name}
    assert card(previous_card)[FILE_KEY]["file"] == a_file.name
    assert load_detector(find_detector(folder, MODEL), SHA).classifier.kind == "random_forest"

    again = activate_detector(b, model_card, SHA)
    assert again.id == b_id and again.previous_id == shipped_id
    assert again.removed == (a_file,) and not a_file.exists()  # no card names it any more
    assert sorted(p.name for p in folder.iterdir()) == sorted([
        "candidates", f"{MODEL}.json", f"{MODEL}.pt", f"{MODEL}.detector.npz", f"{MODEL}.detector.json",
        f"{MODEL}.detector.previous.json", f"{MODEL}.detector.lock", b_file.name])  # no temporary left behind
    # a rollback can itself be rolled back
    assert rollback_detector(model_card, SHA).id == shipped_id
    assert rollback_detector(model_card, SHA).id == b_id
    assert load_detector(detector_path(folder, MODEL), SHA).threshold == 0.7


def test_refused_candidates_leave_the_active_detector_untouched(folder):
    model_card = folder / f"{MODEL}.json"
    other = candidate(folder, "other", 1, 0.3, sha="cd" * 32)  # trained for other weights
    before = snapshot(folder)
    with pytest.raises(WeightsMismatchError, match="trained for model 'lenet5' with weights sha256 cdcd"):
        activate_detector(other, model_card, SHA)
    assert snapshot(folder) == before
    with pytest.raises(ActivationError, match="no previous detector to roll back to"):
        rollback_detector(model_card, SHA)
    assert snapshot(folder) == before
    # a file that is not the one its card describes, and arrays that are no classifier (with a matching sha256)
    broken = candidate(folder, "broken", 2, 0.3)
    broken.write_bytes(broken.read_bytes() + b"\0")
    garbage = candidate(folder, "garbage", 3, 0.3)
    garbage.write_bytes(b"not an npz archive")
    spec = card(card_path_for(garbage))
    spec[FILE_KEY]["sha256"] = hashlib.sha256(garbage.read_bytes()).hexdigest()
    card_path_for(garbage).write_text(json.dumps(spec))
    before = snapshot(folder)
    with pytest.raises(DetectorLoadError, match="has sha256 .* but its card"):
        activate_detector(broken, model_card, SHA)
    with pytest.raises(DetectorLoadError, match="not an archive of numeric arrays"):
        activate_detector(garbage, model_card, SHA)
    assert snapshot(folder) == before  # not even the content-addressed copy is left
    assert load_detector(find_detector(folder, MODEL), SHA).threshold == 0.5


def test_concurrent_activations_are_serialised(folder):
    """Two threads activate and roll back at once (each with its own lock file descriptor, as two processes
    would): every step sees a consistent pair of cards, and the end state is one of them active, the other kept,
    every named file present and no other content-addressed file or temporary left."""
    model_card = folder / f"{MODEL}.json"
    candidates = [candidate(folder, "a", 1, 0.3), candidate(folder, "b", 2, 0.7)]
    ids = {file_id(path) for path in candidates} | {file_id(detector_path(folder, MODEL))}
    errors: list[BaseException] = []

    def work(path: Path) -> None:
        try:
            for i in range(6):
                done = rollback_detector(model_card, SHA) if i % 3 == 2 else activate_detector(path, model_card, SHA)
                assert done.id in ids and done.file.is_file()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(path,)) for path in candidates]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    active, kept = card(folder / f"{MODEL}.detector.json"), card(folder / f"{MODEL}.detector.previous.json")
    named = {active[FILE_KEY]["file"], kept[FILE_KEY]["file"]}
    assert active["activation"]["previous"]["file"] == kept[FILE_KEY]["file"]
    assert all((folder / name).is_file() for name in named)
    stray = {p.name for p in folder.glob(f"{MODEL}.detector.*.npz")} - named - {f"{MODEL}.detector.npz"}
    assert not stray and not list(folder.glob(".*"))
    assert load_detector(folder / f"{MODEL}.detector.json", SHA).threshold in (0.3, 0.5, 0.7)
    assert load_detector(folder / f"{MODEL}.detector.previous.json", SHA).threshold in (0.3, 0.5, 0.7)


def test_a_card_may_only_name_a_file_next_to_it(folder):
    path = detector_path(folder, MODEL)
    spec = card(card_path_for(path))
    for named in ("../lenet5.pt", "/etc/passwd.npz", "sub/x.npz", "x.json"):
        spec[FILE_KEY]["file"] = named
        card_path_for(path).write_text(json.dumps(spec))
        with pytest.raises(DetectorLoadError, match="file must name a .npz next to the card"):
            load_detector(path, SHA)


def test_the_cli_activates_and_rolls_back(folder, monkeypatch, capsys):
    base_id = file_id(detector_path(folder, MODEL))
    a = candidate(folder, "a", 1, 0.3)
    other = candidate(folder, "other", 1, 0.3, sha="cd" * 32)
    monkeypatch.setenv("FISHER_GUARD_MODELS_DIR", str(folder))
    monkeypatch.delenv("FISHER_GUARD_USER_MODELS_DIR", raising=False)
    get_settings.cache_clear()
    try:
        assert cli_main(["activate-detector", str(a)]) == 0
        out = capsys.readouterr().out
        assert f"active detector of {MODEL}: {folder / f'{MODEL}.detector.{file_id(a)}.npz'}" in out
        assert f"kept for rollback: {detector_path(folder, MODEL)} (detector {base_id})" in out
        assert cli_main(["activate-detector", "--rollback", "--model", MODEL]) == 0
        out = capsys.readouterr().out
        assert f"(detector {base_id}" in out.splitlines()[0] and f"(detector {file_id(a)})" in out.splitlines()[1]
        assert cli_main(["activate-detector", str(other)]) == 1
        assert "trained for model 'lenet5' with weights sha256 cdcd" in capsys.readouterr().err
        assert cli_main(["activate-detector"]) == 2 and cli_main(["activate-detector", "--rollback"]) == 2
        assert cli_main(["activate-detector", str(a), "--rollback"]) == 2
    finally:
        get_settings.cache_clear()
    assert load_detector(detector_path(folder, MODEL), SHA).threshold == 0.5


# --------------------------------------------------------------------------------------- the jobs' cache

def test_the_job_workers_model_cache_follows_the_active_detector(folder):
    from jobs_support import queue_settings, wait_for

    from service.jobs.local_backend import InProcessJobQueue
    from service.jobs.types import JobRequest, JobStatus

    base_id = file_id(detector_path(folder, MODEL))
    a = candidate(folder, "a", 1, 0.3)
    model_cache.configure([folder], "cpu")
    queue = InProcessJobQueue(queue_settings(models_dir=folder, user_models_dir=None, device="cpu"))

    def screened_threshold() -> float:
        info = queue.submit(JobRequest(type="screen", model=MODEL, dataset="mnist:test", limit=4))
        final = wait_for(queue, info.id, timeout=120)
        assert final.status == JobStatus.succeeded, final.error
        return queue.result(info.id)["threshold"]

    try:
        before = model_cache.get_bundle(MODEL)
        assert before.detector_state.id == base_id and model_cache.get_bundle(MODEL) is before  # nothing changed
        assert screened_threshold() == 0.5
        activate_detector(a, folder / f"{MODEL}.json", SHA)
        after = model_cache.get_bundle(MODEL)
        assert after.detector_state.id == file_id(a) and after.detector.threshold == 0.3
        assert after.loaded is before.loaded  # the model is not loaded again
        assert before.detector_state.id == base_id  # a job that holds the old bundle keeps its detector
        assert screened_threshold() == 0.3  # a job that starts after the activation uses the new one
        rollback_detector(folder / f"{MODEL}.json", SHA)
        assert screened_threshold() == 0.5
    finally:
        queue.close()
        model_cache.configure(get_settings().model_folders(), "auto")


# ------------------------------------------------------------------------------------------ the endpoints

def test_activation_over_http_needs_api_keys(folder):
    """Without configured keys nobody can be told apart: refused, pointing at the CLI (before anything else)."""
    from fastapi.testclient import TestClient

    from service.api import create_app

    client = TestClient(create_app(Settings(models_dir=folder, user_models_dir=None, device="cpu",
                                            serve_models=[MODEL], api_keys=[], admin_api_keys=[])))
    for path, body in ((f"/v1/models/{MODEL}/detector", {"candidate": "x.npz"}),
                       (f"/v1/models/{MODEL}/detector/rollback", None)):
        problem = assert_problem(client.post(path, json=body), 403, "api_keys_not_configured")
        assert "needs API keys" in problem["detail"] and "fisher-guard activate-detector" in problem["detail"]


def test_the_activation_endpoints(folder, tmp_path):
    from fastapi.testclient import TestClient

    from service.api import create_app

    base_id = file_id(detector_path(folder, MODEL))
    a, b = candidate(folder, "a", 1, 0.3), candidate(folder, "b", 2, 0.7)
    other = candidate(folder, "other", 1, 0.3, sha="cd" * 32)
    (tmp_path / "outside.npz").write_bytes(a.read_bytes())
    (folder / "candidates" / "link.npz").symlink_to(tmp_path / "outside.npz")
    settings = Settings(models_dir=folder, user_models_dir=None, device="cpu", serve_models=[MODEL],
                        api_keys=[KEY], admin_api_keys=[ADMIN], detector_poll_s=0)  # no watcher: swaps at once
    url = f"/v1/models/{MODEL}/detector"
    admin = {"Authorization": f"Bearer {ADMIN}"}
    image = {"tensor": np.full((28, 28), 0.3).tolist()}
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        wait_ready(client)

        def screened() -> dict:
            response = client.post(f"/v1/models/{MODEL}/screen", json=image, headers=admin)
            assert response.status_code == 200, response.text
            return response.json()

        def shown() -> dict:
            return client.get(f"/v1/models/{MODEL}", headers={"X-API-Key": KEY}).json()["detector"]

        info = shown()
        assert (info["id"], info["activated_at"], info["rollback_available"], info["previous_id"]) == (
            base_id, None, False, None)
        assert (info["auc"], info["auc_split"], info["tpr"], info["fpr"], info["clean_fpr"], info["target_fpr"]) == (
            0.9, "test", 0.8, 0.05, 0.04, 0.05)
        assert screened()["detector_id"] == base_id

        # keys: none or unknown -> 401, a plain one -> 403
        assert_problem(client.post(url, json={"candidate": a.name}), 401)
        assert_problem(client.post(url, json={"candidate": a.name}, headers={"X-API-Key": "wrong"}), 401)
        for path in (url, url + "/rollback"):
            assert_problem(client.post(path, json={"candidate": a.name}, headers={"X-API-Key": KEY}), 403,
                           "admin_key_required")
        # names only, inside candidates/
        for name in ("../lenet5.detector.npz", "/etc/passwd", "sub/a.npz", "..", ".", ".hidden.npz",
                     "a.json", "a\\b.npz", "a.npz\x00", a.name + "/"):
            assert_problem(client.post(url, json={"candidate": name}, headers=admin), 422, "invalid_candidate")
        assert_problem(client.post(url, json={"candidate": ""}, headers=admin), 422)
        assert_problem(client.post(url, json={"candidate": a.name, "path": "/x"}, headers=admin), 422)
        for name in ("nope.npz", "link.npz", "%2e%2e%2flenet5.detector.npz"):
            assert_problem(client.post(url, json={"candidate": name}, headers=admin), 404, "unknown_candidate")
        assert_problem(client.post("/v1/models/nope/detector", json={"candidate": a.name}, headers=admin), 404,
                       "unknown_model")
        assert_problem(client.post(url + "/rollback", headers=admin), 409, "no_previous_detector")
        problem = assert_problem(client.post(url, json={"candidate": other.name}, headers=admin), 409,
                                 "weights_mismatch")
        assert "trained for model 'lenet5' with weights sha256 cdcd" in problem["detail"]
        assert shown()["id"] == base_id

        response = client.post(url, json={"candidate": a.name}, headers=admin)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["detector"]["id"] == file_id(a) and body["source"] == a.name and body["detector_error"] is None
        assert body["previous"] == {"id": base_id, "file": f"{MODEL}.detector.npz"} and body["removed"] == []
        answer = screened()  # this process swapped at once
        assert (answer["detector_id"], answer["threshold"]) == (file_id(a), 0.3)
        info = shown()
        assert info["id"] == file_id(a) and info["file"] == f"{MODEL}.detector.{file_id(a)}.npz"
        assert info["activated_at"].endswith("Z") and info["rollback_available"] and info["previous_id"] == base_id
        assert info["auc"] == 0.91

        body = client.post(url + "/rollback", headers=admin).json()
        assert body["detector"]["id"] == base_id and body["source"] == "rollback"
        assert body["previous"]["id"] == file_id(a) and screened()["detector_id"] == base_id
        body = client.post(url, json={"candidate": b.name}, headers=admin).json()
        assert body["detector"]["id"] == file_id(b) and body["removed"] == [f"{MODEL}.detector.{file_id(a)}.npz"]
        assert (screened()["threshold"], shown()["previous_id"]) == (0.7, base_id)


# ----------------------------------------------------------- the swap under load, two uvicorn processes

def start(folder: Path, log: Path) -> tuple[str, subprocess.Popen]:
    """`fisher-guard serve` on a free port (not waited for), watching the active card every 0.2 s."""
    port = free_port()
    keys = ("FISHER_GUARD_API_KEYS", "FISHER_GUARD_ADMIN_API_KEYS", "FISHER_GUARD_USER_MODELS_DIR")
    env = {**{k: v for k, v in os.environ.items() if k not in keys}, "FISHER_GUARD_MODELS_DIR": str(folder),
           "FISHER_GUARD_SERVE_MODELS": MODEL, "FISHER_GUARD_DEVICE": "cpu", "FISHER_GUARD_DETECTOR_POLL_S": "0.2",
           "FISHER_GUARD_LOG_LEVEL": "info", "FISHER_GUARD_REQUEST_TIMEOUT_S": "120"}
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--threads",
                                    "1"], cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    return f"http://127.0.0.1:{port}", process


def wait_until(condition, what: str, timeout: float, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {log}\n{log.read_text()[-2000:]}" for log in logs)
            raise AssertionError(f"{what}: not within {timeout} s\n{tails}")
        time.sleep(0.1)


def ready(base: str, process: subprocess.Popen, log: Path) -> bool:
    if process.poll() is not None:
        raise AssertionError(f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
    try:
        return httpx.get(f"{base}/health/ready", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def test_the_swap_under_concurrent_screening_with_two_api_processes(folder, tmp_path):
    """Two API processes share one models folder; client threads screen without pause while a detector is
    activated, then rolled back. No request fails; each answer names the old or the new detector, with that
    detector's threshold and scores; in each process, once an answer from the detector swapped in has arrived,
    no request sent after it is answered by the one swapped out; and both processes end on the detector swapped
    in each time (waited for as a condition), which /v1/models then shows."""
    from service.zoo.registry import load_model

    old_id = file_id(detector_path(folder, MODEL))
    new = candidate(folder, "new", 1, 0.3)
    new_id = file_id(new)
    images = [np.random.default_rng(i).random((1, 28, 28)).astype(np.float32) for i in range(2)]
    module = load_model(folder / f"{MODEL}.json", device="cpu").module
    expected = {key: [float(load_detector(path, SHA).score(module, torch.from_numpy(x[None])).scores[0])
                      for x in images]
                for key, path in ((old_id, detector_path(folder, MODEL)), (new_id, new))}
    assert all(abs(o - n) > 1e-3 for o, n in zip(expected[old_id], expected[new_id], strict=True)), expected
    thresholds = {old_id: 0.5, new_id: 0.3}

    logs = [tmp_path / "server-0.log", tmp_path / "server-1.log"]
    servers = [start(folder, log) for log in logs]
    answers: list[tuple[int, float, float, int, dict | str]] = []  # server, sent, received, status, body
    stop = threading.Event()

    def client(server: int, offset: int) -> None:
        base = servers[server][0]
        with httpx.Client(timeout=120) as http:
            n = offset
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    response = http.post(f"{base}/v1/models/{MODEL}/screen",
                                         json={"tensor": images[n % 2].tolist()})
                    body = {**response.json(), "n": n} if response.status_code == 200 else response.text
                    answers.append((server, sent, time.monotonic(), response.status_code, body))
                except httpx.HTTPError as exc:
                    answers.append((server, sent, time.monotonic(), 0, repr(exc)))
                n += 1

    def answered(detector: str, after: float) -> bool:
        """Each server has answered at least 10 requests sent after `after` with `detector`."""
        return all(sum(1 for s, sent, _, status, body in list(answers) if s == server and sent > after
                       and status == 200 and body["detector_id"] == detector) >= 10 for server in (0, 1))

    threads = [threading.Thread(target=client, args=(server, offset), daemon=True)
               for server in (0, 1) for offset in (0, 1)]
    swaps: list[tuple[float, str, str]] = []  # when, the detector swapped out, the one swapped in
    try:
        wait_until(lambda: all(ready(base, process, log) for (base, process), log in zip(servers, logs, strict=True)),
                   "both servers ready", 240, logs)
        for thread in threads:
            thread.start()
        wait_until(lambda: answered(old_id, 0.0), "both answering with the old detector", 120, logs)
        swaps.append((time.monotonic(), old_id, new_id))
        activate_detector(new, folder / f"{MODEL}.json", SHA)
        wait_until(lambda: answered(new_id, swaps[-1][0]), "both answering with the new detector", 120, logs)
        swaps.append((time.monotonic(), new_id, old_id))
        rollback_detector(folder / f"{MODEL}.json", SHA)
        wait_until(lambda: answered(old_id, swaps[-1][0]), "both answering with the old detector again", 120, logs)
    finally:
        stop.set()
        for thread in threads:
            thread.join(150)
    try:
        failed = [answer for answer in answers if answer[3] != 200]
        assert answers and not failed, failed[:5]
        for server in (0, 1):
            mine = [(sent, received, body) for s, sent, received, _, body in answers if s == server]
            for _, _, body in mine:  # one detector per answer: its id, its threshold, its scores
                detector = body["detector_id"]
                assert detector in thresholds and body["threshold"] == thresholds[detector]
                assert body["results"][0]["score"] == pytest.approx(expected[detector][body["n"] % 2], abs=1e-4)
            assert all(body["detector_id"] == old_id for _, received, body in mine if received < swaps[0][0])
            for i, (when, out, swapped_in) in enumerate(swaps):
                until = swaps[i + 1][0] if i + 1 < len(swaps) else float("inf")
                window = [(sent, received, body["detector_id"]) for sent, received, body in mine
                          if when <= sent < until]
                seen = {detector for _, _, detector in window}
                assert swapped_in in seen and seen <= {out, swapped_in}, (server, i, seen)
                first_in = min(received for _, received, detector in window if detector == swapped_in)
                late = [sent - first_in for sent, _, detector in window if detector == out and sent > first_in]
                assert not late, f"server {server}, swap {i}: the old detector answered requests sent after the new"
            shown = httpx.get(f"{servers[server][0]}/v1/models/{MODEL}", timeout=30).json()["detector"]
            assert (shown["id"], shown["previous_id"], shown["rollback_available"]) == (old_id, new_id, True)
            assert shown["activated_at"]
    finally:
        for _, process in servers:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for _, process in servers:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
