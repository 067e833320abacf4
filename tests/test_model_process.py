"""The model process (`fisher-guard serve --workers 2 --model-process`): its parts against their definitions (the
shared-memory arena, the frames, the errors that cross), then real processes over HTTP: the answers are the
engine's, the batches are counted once across API processes, and the failure modes hold: the model process dies
(requests in flight and new ones get 503, readiness turns off, and the service recovers once it is restarted),
and an API process dies (the rest answer on, the model process stays, uvicorn replaces the API process)."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import psutil
import pytest
import torch
from support import free_port
from test_e2e import metric_value, start_server, stop_server

from service.api.cpu_kernels import KernelPolicy, with_kernels
from service.api.micro_batcher import QueueFullError, WorkerClosedError
from service.api.model_link import (
    BLOCK,
    ImageArena,
    ModelUnavailableError,
    encode_frame,
    error_document,
    raise_error,
    read_frame,
)
from service.config import Settings
from service.data.mnist import load_mnist
from service.fisher import fisher_spectrum

MODEL = "lenet5"
SCREEN = f"/v1/models/{MODEL}/screen"


# ---- the parts ----

def test_the_arena_gives_disjoint_blocks_and_merges_what_comes_back(tmp_path):
    arena = ImageArena(tmp_path / "arena", 8 * BLOCK, create=True)
    try:
        a, b, c = arena.take(BLOCK), arena.take(2 * BLOCK + 1), arena.take(1)
        assert (a, b, c) == (0, BLOCK, 4 * BLOCK)  # 2 blocks + 1 byte take 3 blocks
        assert arena.take(5 * BLOCK) is None  # 4 blocks are left
        arena.give_back(b, 2 * BLOCK + 1)
        arena.give_back(a, BLOCK)
        assert arena.free == [(0, 4), (5, 3)]  # the first four merged; c still holds block 4
        arena.give_back(c, 1)
        assert arena.free == [(0, 8)] and arena.take(8 * BLOCK) == 0
    finally:
        arena.close()
    assert not (tmp_path / "arena").exists()  # the creator removes the file


def test_images_cross_the_arena_unchanged_and_bad_descriptions_are_refused(tmp_path):
    writer = ImageArena(tmp_path / "arena", 4 * BLOCK, create=True)
    reader = ImageArena(tmp_path / "arena", 4 * BLOCK, create=False)  # as the model process maps it
    try:
        images = torch.rand(3, 1, 8, 8)
        where = writer.write(writer.take(images.numel() * 4), images)
        assert torch.equal(reader.read(where), images)
        for bad in ({**where, "offset": 4 * BLOCK}, {**where, "dtype": "object"}, {**where, "shape": [3, -1]},
                    {**where, "shape": [1000, 1, 8, 8]}, {**where, "offset": "0"}):
            with pytest.raises(ValueError):
                reader.read(bad)
        with pytest.raises(ValueError, match="smaller"):
            ImageArena(tmp_path / "arena", 8 * BLOCK, create=False)
    finally:
        reader.close()
        writer.close()


def test_frames_round_trip_and_end_cleanly():
    async def run() -> list:
        reader = asyncio.StreamReader()
        reader.feed_data(encode_frame({"id": 1, "key": ["spectrum", 5, "auto", "none"]}) + encode_frame({"x": 2.5}))
        reader.feed_data(encode_frame({"cut": True})[:7])  # a frame cut short by a dying peer
        reader.feed_eof()
        return [await read_frame(reader) for _ in range(3)]

    assert asyncio.run(run()) == [{"id": 1, "key": ["spectrum", 5, "auto", "none"]}, {"x": 2.5}, None]


@pytest.mark.parametrize(("error", "raised"), [
    (QueueFullError("lenet5", 8), QueueFullError), (ValueError("k must lie in [1, 20]"), ValueError),
    (WorkerClosedError("the service is shutting down"), ModelUnavailableError), (KeyError("boom"), RuntimeError)])
def test_errors_cross_the_link_as_what_the_api_answers(error, raised):
    with pytest.raises(raised) as caught:
        raise_error(error_document(error))
    assert str(error).strip("'") in str(caught.value)


# ---- real processes ----

@pytest.fixture(scope="module")
def served(api_models_dir, tmp_path_factory):
    """`serve --workers 2 --model-process` once both API processes are ready; yields (base URL, serve process)."""
    log = tmp_path_factory.mktemp("model-process") / "server.log"
    base, process = start_server(api_models_dir, log, "--workers", "2", "--model-process",
                                 FISHER_GUARD_BATCH_MAX_WAIT_MS="20")
    try:
        deadline = time.monotonic() + 180
        while metric_value(httpx.get(f"{base}/metrics", headers={"Connection": "close"}).text,
                           "fisher_guard_ready") != 1 or len(api_processes(process)) != 2:
            assert time.monotonic() < deadline, "both API processes did not become ready"
            time.sleep(0.5)
        yield base, process
    finally:
        stop_server(process)
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]


def api_processes(serve: object) -> list[psutil.Process]:
    """uvicorn's worker processes under `serve` (spawned: `multiprocessing.spawn`), live ones only."""
    out = []
    for child in psutil.Process(serve.pid).children():  # type: ignore[attr-defined]
        try:
            if "spawn_main" in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                out.append(child)
        except psutil.NoSuchProcess:
            pass
    return out


def gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def model_process(serve: object) -> psutil.Process:
    found = [child for child in psutil.Process(serve.pid).children()  # type: ignore[attr-defined]
             if "model-process" in " ".join(child.cmdline())]
    assert len(found) == 1, found
    return found[0]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return load_mnist("test")[0][:12]


def with_worker_kernels(fn, batch: torch.Tensor):
    """fn(batch) under the model worker's default kernel policy, as the model process runs it: the kernels decide
    how rounding breaks the ties of max-pooling over flat backgrounds, and so which pixels get the gradient."""
    settings = Settings()
    policy = KernelPolicy(settings.api_torch_threads, settings.api_torch_threads_large_batch,
                          settings.api_large_batch, settings.api_small_batch_onednn)
    return with_kernels(fn, batch, policy)


def engine_screen(engine, batch: torch.Tensor):
    module, detector, _ = engine
    return with_worker_kernels(lambda x: detector.score(module, x), batch)


def test_answers_are_the_engines(served, engine, images):
    base, _ = served
    expected = engine_screen(engine, images[:4])
    body = httpx.post(f"{base}{SCREEN}", json={"tensor": images[:4].tolist()}, timeout=60).json()
    assert [r["prediction"] for r in body["results"]] == expected.predictions.tolist()
    np.testing.assert_allclose([r["score"] for r in body["results"]], expected.scores, atol=1e-9)
    np.testing.assert_allclose([r["eigenvalues"] for r in body["results"]], expected.eigenvalues, rtol=1e-5)
    assert body["detector_id"] and body["threshold"] == pytest.approx(engine[1].threshold)
    spectrum = httpx.post(f"{base}/v1/models/{MODEL}/spectrum", json={"tensor": images[:2].tolist(), "k": 9},
                          timeout=60).json()
    top = with_worker_kernels(lambda x: fisher_spectrum(engine[0], x, k=9).eigenvalues, images[:2])
    np.testing.assert_allclose([r["eigenvalues"] for r in spectrum["results"]], top.numpy(), rtol=1e-5)
    attack = httpx.post(f"{base}/v1/models/{MODEL}/attack", json={"tensor": images[:1].tolist(), "attack": "ossa",
                                                                  "epsilon": 2.0, "output": "tensor"}, timeout=60)
    assert attack.status_code == 200
    assert np.linalg.norm(np.asarray(attack.json()["results"][0]["adversarial"]) - images[0].numpy()) <= 2.0 + 1e-4
    v2 = httpx.post(f"{base}/v2/models/{MODEL}/infer", timeout=60, json={
        "inputs": [{"name": "input", "shape": [2, 1, 28, 28], "datatype": "FP32",
                    "data": images[:2].flatten().tolist()}], "outputs": [{"name": "adversarial_score"}]}).json()
    np.testing.assert_allclose(v2["outputs"][0]["data"], engine_screen(engine, images[:2]).scores, atol=1e-9)
    assert httpx.get(f"{base}/v1/models/{MODEL}").json()["device"] == "cpu"


def test_concurrent_clients_of_both_processes_get_their_own_rows_and_each_batch_counts_once(served, engine, images):
    """16 clients at once on fresh connections (spread over both API processes): each gets its own image's answer;
    the batch-size histogram, summed over the processes, counts every image exactly once."""
    base, _ = served
    expected = engine_screen(engine, images)
    before = httpx.get(f"{base}/metrics").text

    def screen(i: int) -> dict:
        response = httpx.post(f"{base}{SCREEN}", json={"tensor": images[i % len(images)].tolist()}, timeout=60,
                              headers={"Connection": "close"})
        assert response.status_code == 200, response.text
        return response.json()["results"][0]

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(screen, range(32)))
    for i, answer in enumerate(answers):
        assert answer["prediction"] == int(expected.predictions[i % len(images)])
        assert answer["score"] == pytest.approx(float(expected.scores[i % len(images)]), abs=1e-6)  # any batch
    after = httpx.get(f"{base}/metrics").text
    grew = lambda name: metric_value(after, name, model=MODEL, kind="screen") - metric_value(  # noqa: E731
        before, name, model=MODEL, kind="screen")
    assert grew("fisher_guard_batch_size_images_sum") == 32
    assert 1 <= grew("fisher_guard_batch_size_images_count") <= 32


def test_the_model_process_dies_requests_get_503_and_the_service_recovers(served, images):
    """The model process is frozen (SIGSTOP) with a request in flight, then killed: that request and new ones get
    503 with Retry-After, readiness is off, and once `serve` has started it again every request is answered."""
    base, process = served
    victim = model_process(process)
    victim.send_signal(signal.SIGSTOP)
    answer: dict = {}
    in_flight = threading.Thread(target=lambda: answer.setdefault("response", httpx.post(
        f"{base}{SCREEN}", json={"tensor": images[0].tolist()}, timeout=60)))
    in_flight.start()
    deadline = time.monotonic() + 60
    while metric_value(httpx.get(f"{base}/metrics").text, "fisher_guard_images_in_flight", model=MODEL) < 1:
        assert time.monotonic() < deadline, "the request did not reach the model"
        time.sleep(0.05)
    victim.kill()
    in_flight.join(60)
    response = answer["response"]
    assert response.status_code == 503 and response.json()["code"] == "model_unavailable"
    assert response.headers["Retry-After"] == "1"
    deadline = time.monotonic() + 30  # each API process, whichever answers, has seen its link go by now
    while (ready := httpx.get(f"{base}/health/ready", headers={"Connection": "close"})).status_code == 200:
        assert time.monotonic() < deadline, "readiness stayed on while the model process was down"
        time.sleep(0.05)
    assert ready.status_code == 503 and ready.json()["code"] in ("model_unavailable", "not_ready")
    deadline = time.monotonic() + 180
    while (response := httpx.post(f"{base}{SCREEN}", json={"tensor": images[1].tolist()}, timeout=60)).status_code \
            != 200:
        assert response.status_code == 503 and response.json()["code"] in ("model_unavailable", "not_ready")
        assert time.monotonic() < deadline, "the service did not recover"
        time.sleep(0.2)
    assert model_process(process).pid != victim.pid
    assert httpx.get(f"{base}/health/ready").status_code == 200


def test_an_api_process_dies_the_rest_answer_and_it_is_replaced(served, images):
    base, process = served
    model = model_process(process)
    victim = api_processes(process)[0]
    victim.kill()
    deadline = time.monotonic() + 60
    while not gone(victim):  # dead (a zombie until uvicorn's supervisor, not this test, reaps it)
        assert time.monotonic() < deadline, "the API process did not die"
        time.sleep(0.05)
    answered, deadline = 0, time.monotonic() + 120
    while answered < 12:  # new connections each: the live API process, or its replacement once it is up
        response = httpx.post(f"{base}{SCREEN}", json={"tensor": images[answered].tolist()}, timeout=60,
                              headers={"Connection": "close"})
        if response.status_code == 200:
            answered += 1
        else:  # only the replacement, still loading, may refuse
            assert response.status_code == 503 and response.json()["code"] == "not_ready", response.text
        assert time.monotonic() < deadline, "the API processes stopped answering"
    deadline = time.monotonic() + 180
    while len(replaced := api_processes(process)) != 2 or victim.pid in [p.pid for p in replaced]:
        assert time.monotonic() < deadline, "uvicorn did not replace the API process"
        time.sleep(0.5)
    assert model_process(process).pid == model.pid and model.is_running()


def test_a_request_larger_than_the_arena_is_refused_before_anything_is_sent(tmp_path):
    from service.api.model_link import ModelLink

    link = ModelLink(str(tmp_path / "nobody.sock"), 4 * BLOCK)  # never connected: the size is checked first
    with pytest.raises(ValueError, match="model_process_arena_mb"):
        asyncio.run(link.call(MODEL, ("screen",), torch.zeros(8, 1, 28, 28), batched=True))


def test_a_full_arena_is_503_and_nothing_accepted_is_lost(api_models_dir, tmp_path, images):
    """One API process with a 1 MiB arena, the model process frozen: a 256-image request in flight holds ~0.8 MiB,
    so a second is refused with 503 `overloaded` that says why; once the model runs again the first is answered
    in full and the second goes through."""
    base, process = start_server(api_models_dir, tmp_path / "server.log", "--model-process",
                                 FISHER_GUARD_MODEL_PROCESS_ARENA_MB="1")
    try:
        batch = load_mnist("test")[0][:256].tolist()
        frozen = model_process(process)
        frozen.send_signal(signal.SIGSTOP)
        answer: dict = {}
        first = threading.Thread(target=lambda: answer.setdefault("response", httpx.post(
            f"{base}{SCREEN}", json={"tensor": batch}, timeout=120)))
        first.start()
        try:
            deadline = time.monotonic() + 60
            while metric_value(httpx.get(f"{base}/metrics").text, "fisher_guard_images_in_flight", model=MODEL) < 256:
                assert time.monotonic() < deadline, "the first request did not reach the model"
                time.sleep(0.05)
            refused = httpx.post(f"{base}{SCREEN}", json={"tensor": batch}, timeout=120)
            assert refused.status_code == 503 and refused.json()["code"] == "overloaded"
            assert "shared memory" in refused.json()["detail"] and refused.headers["Retry-After"] == "1"
        finally:
            frozen.send_signal(signal.SIGCONT)
        first.join(120)
        assert answer["response"].status_code == 200 and len(answer["response"].json()["results"]) == 256
        again = httpx.post(f"{base}{SCREEN}", json={"tensor": batch}, timeout=120)
        assert again.status_code == 200 and len(again.json()["results"]) == 256
        # a request abandoned while the model process is frozen: its work and its cancellation arrive together,
        # and its block still comes back (else the next 256-image request would find the arena full)
        frozen.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(httpx.TimeoutException):
                httpx.post(f"{base}{SCREEN}", json={"tensor": batch}, timeout=httpx.Timeout(60, read=2))
            deadline = time.monotonic() + 60
            while metric_value(httpx.get(f"{base}/metrics").text, "fisher_guard_images_in_flight", model=MODEL) > 0:
                assert time.monotonic() < deadline, "the abandoned request was not dropped"
                time.sleep(0.05)
        finally:
            frozen.send_signal(signal.SIGCONT)
        after = httpx.post(f"{base}{SCREEN}", json={"tensor": batch}, timeout=120)
        assert after.status_code == 200 and len(after.json()["results"]) == 256
    finally:
        stop_server(process)
    assert "Traceback" not in (tmp_path / "server.log").read_text()


def test_models_that_do_not_load_in_the_model_process_keep_the_api_unready_and_say_why(api_models_dir, tmp_path):
    """Weights that are not the card's (not even a state dict): the model process stays up (no restart loop) and
    every API process's readiness is 503 with its reason."""
    import json
    import shutil
    import subprocess
    import sys

    from test_e2e import REPO

    folder = tmp_path / "models"
    shutil.copytree(api_models_dir, folder)
    card = json.loads((folder / f"{MODEL}.json").read_text())
    (folder / card["weights"]).write_bytes(b"not a state dict")
    port = free_port()
    env = {**os.environ, "FISHER_GUARD_MODELS_DIR": str(folder), "FISHER_GUARD_SERVE_MODELS": MODEL,
           "FISHER_GUARD_DEVICE": "cpu"}
    env.pop("FISHER_GUARD_API_KEYS", None)
    with open(tmp_path / "server.log", "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--threads",
                                    "1", "--model-process"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=5)
                if "could not load its models" in ready.text:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.3)
        detail = ready.json()["detail"]
        assert ready.status_code == 503 and "ModelLoadError" in detail and card["weights"] in detail
        first = model_process(process).pid
        time.sleep(2)  # a restart loop would have replaced it by now (its pause starts at 1 s)
        assert model_process(process).pid == first
    finally:
        stop_server(process)
