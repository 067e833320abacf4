"""The service on a GPU: spectra against the dense float64 reference, attacks against their CPU answers, the
shipped detector's scores, the HTTP API and a job worker serving from CUDA.

Skipped where torch sees no CUDA device (CI has none); on a GPU machine `pytest tests/test_cuda.py` runs them.
The CPU suite pins `device="cpu"` everywhere, so these are the only tests of the CUDA paths.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from service.attacks import bim, cw_l2, fgm, iterative_ossa, least_norm_search, ossa, otcm
from service.config import Settings
from service.data.mnist import load_mnist
from service.detect.files import detector_path, load_detector
from service.fisher import dense_fisher, dense_spectrum, fisher_spectrum
from service.zoo.registry import load_model, resolve_device, use_full_float32

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

REPO = Path(__file__).resolve().parent.parent
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True, scope="module")
def full_float32():
    """As every CUDA model load sets it (registry.use_full_float32): these tests build models by hand."""
    use_full_float32()


def on_cuda(case) -> tuple[torch.nn.Module, torch.Tensor]:
    return copy.deepcopy(case.model).to(CUDA), case.images.to(CUDA)


@pytest.fixture(scope="module")
def shipped() -> dict:
    """The shipped LeNet-5 and its detector, loaded on the GPU and on the CPU, and 32 clean + 32 OSSA digits."""
    gpu, cpu = load_model("lenet5", device="cuda"), load_model("lenet5", device="cpu")
    detector = load_detector(detector_path(REPO / "models", "lenet5"), cpu.sha256)
    images, labels = load_mnist("test")
    clean, labels = images[:32], labels[:32]
    adversarial = ossa(cpu.module, clean, labels, epsilon=3.0).adversarial
    return {"gpu": gpu, "cpu": cpu, "detector": detector, "images": torch.cat([clean, adversarial])}


def test_auto_resolves_to_an_indexed_cuda_device():
    assert resolve_device("auto") == torch.device("cuda", torch.cuda.current_device())
    assert resolve_device("cuda").index is not None, "responses name the device: 'cuda:0', not 'cuda'"


@pytest.mark.parametrize("name", ["cnn", "lenet"])
def test_exact_spectrum_on_cuda_matches_dense(name, request):
    """Float32 on the GPU: the same 1e-5 tolerance as on the CPU (test_fisher)."""
    case = request.getfixturevalue(f"{name}_case")
    model, x = on_cuda(case)
    reference = copy.deepcopy(case.model).double()
    k = case.num_classes - 1
    spectrum = fisher_spectrum(model, x, k=k, method="exact", return_vectors=True)
    assert spectrum.eigenvalues.device.type == "cuda" and spectrum.eigenvectors.device.type == "cuda"
    for i in range(x.shape[0]):
        evals, evecs = dense_spectrum(dense_fisher(reference, case.images[i].double())[0])
        assert float((spectrum.eigenvalues[i].cpu() - evals[:k]).abs().max() / evals[0]) <= 1e-5
        if evals[0] - evals[1] > 1e-2 * evals[0]:
            cosine = float(spectrum.eigenvectors[i, 0].flatten().double().cpu() @ evecs[:, 0])
            assert abs(cosine) == pytest.approx(1.0, abs=1e-4)


def test_cuda_model_loads_turn_tf32_off():
    torch.backends.cudnn.allow_tf32 = True
    load_model("lenet5", device="cuda")
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


def test_dense_reference_of_a_gpu_model_on_the_cpu(lenet_case):
    """dense_fisher computes where the image is: a CPU image of a GPU model gives the CPU reference."""
    model, _ = on_cuda(lenet_case)
    image = lenet_case.images[0]
    g, _, _ = dense_fisher(model, image)
    assert g.device.type == "cpu" and next(model.parameters()).device.type == "cuda"
    torch.testing.assert_close(g, dense_fisher(lenet_case.model, image)[0])
    assert dense_fisher(model, image.to(CUDA))[0].device.type == "cuda"


def test_float64_routes_on_cuda_match_dense(case64):
    model, x = on_cuda(case64)
    k = min(case64.num_classes - 1, 4)
    exact = fisher_spectrum(model, x, k=k, method="exact")
    lanczos = fisher_spectrum(model, x, k=k, method="lanczos", tol=1e-10)
    for i in range(x.shape[0]):
        evals, _ = dense_spectrum(dense_fisher(case64.model, case64.images[i])[0])
        assert float((exact.eigenvalues[i].cpu() - evals[:k]).abs().max() / evals[0]) <= 1e-10
        assert float((lanczos.eigenvalues[i].cpu() - evals[:k]).abs().max() / evals[0]) <= 1e-6


def test_ossa_on_cuda_is_the_dense_top_eigenvector(case64):
    model, x = on_cuda(case64)
    eps = 0.05
    result = ossa(model, x, epsilon=eps, method="exact")
    assert result.adversarial.device.type == "cuda"
    for i in range(x.shape[0]):
        evals, evecs = dense_spectrum(dense_fisher(case64.model, case64.images[i])[0])
        assert evals[0] - evals[1] > 1e-3 * evals[0], "the test needs a clear top eigen-gap"
        delta = (result.adversarial[i] - x[i]).flatten().cpu() / eps
        assert abs(float(delta @ evecs[:, 0])) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("attack, kwargs", [
    (ossa, {"epsilon": 1.0}), (iterative_ossa, {"epsilon": 1.0, "steps": 3}), (fgm, {"epsilon": 1.0}),
    (otcm, {"epsilon": 1.0}), (bim, {"epsilon": 1.0, "steps": 5}), (cw_l2, {"steps": 10}),
])
def test_attacks_on_cuda_equal_their_cpu_answers(attack, kwargs, digits):
    """Float64 copies of the digits model: the GPU computes the same attack as the CPU, to float64 rounding."""
    cpu_model, x, y = copy.deepcopy(digits.model).double(), digits.images[:16].double(), digits.labels[:16]
    gpu_model = copy.deepcopy(cpu_model).to(CUDA)
    on_cpu = attack(cpu_model, x, y, **kwargs)
    on_gpu = attack(gpu_model, x.to(CUDA), y.to(CUDA), **kwargs)
    assert on_gpu.adversarial.device.type == "cuda"
    np.testing.assert_allclose(on_gpu.adversarial.cpu().numpy(), on_cpu.adversarial.numpy(), atol=1e-7)
    assert torch.equal(on_gpu.fooled.cpu(), on_cpu.fooled)


def test_least_norm_search_on_cuda(digits):
    cpu_model, x, y = copy.deepcopy(digits.model).double(), digits.images[:8].double(), digits.labels[:8]
    on_cpu = least_norm_search(cpu_model, x, y, attack="fgm", tol=1e-3)
    on_gpu = least_norm_search(copy.deepcopy(cpu_model).to(CUDA), x.to(CUDA), y.to(CUDA), attack="fgm", tol=1e-3)
    np.testing.assert_allclose(on_gpu.least_norm.cpu().numpy(), on_cpu.least_norm.numpy(), atol=1e-6)
    assert torch.equal(on_gpu.found.cpu(), on_cpu.found)


def test_load_model_on_cuda_gives_the_cpu_logits():
    """Both shipped architectures, BatchNorm folded on the GPU as on the CPU (shallow VGG has BatchNorm)."""
    x = load_mnist("test")[0][:16]
    for name in ("lenet5", "vgg-shallow"):
        gpu, cpu = load_model(name, device="cuda"), load_model(name, device="cpu")
        assert next(gpu.module.parameters()).device.type == "cuda" and gpu.sha256 == cpu.sha256
        with torch.no_grad():
            np.testing.assert_allclose(gpu.module(x.to(gpu.device)).cpu().numpy(), cpu.module(x).numpy(),
                                       rtol=1e-4, atol=1e-4)


def test_shipped_detector_on_cuda_agrees_with_cpu(shipped):
    """Same features to float32 rounding; the forest's scores (sums of leaves) agree but for a rare split."""
    x, detector = shipped["images"], shipped["detector"]
    gpu = detector.score(shipped["gpu"].module, x.to(shipped["gpu"].device))
    cpu = detector.score(shipped["cpu"].module, x)
    np.testing.assert_array_equal(gpu.predictions, cpu.predictions)
    np.testing.assert_allclose(gpu.eigenvalues, cpu.eigenvalues, rtol=1e-3, atol=1e-12)
    diff = np.abs(gpu.scores - cpu.scores)
    assert diff.max() <= 0.05 and (diff <= 1e-4).mean() >= 0.9, diff
    assert (gpu.adversarial == cpu.adversarial).mean() >= 0.95
    assert gpu.adversarial[32:].mean() > gpu.adversarial[:32].mean(), "the OSSA half is flagged more often"


def test_api_serves_from_cuda(shipped):
    """The app on the GPU: the model reports its device, and screen / spectrum / attack answer like the engine."""
    from fastapi.testclient import TestClient

    from service.api import create_app

    settings = Settings(device="cuda", serve_models=["lenet5"], user_models_dir=None, batch_max_size=16,
                        batch_max_wait_ms=2.0)
    x, module, detector = shipped["images"][:8], shipped["gpu"].module, shipped["detector"]
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        deadline = time.monotonic() + 120
        while client.get("/health/ready").status_code != 200:
            assert time.monotonic() < deadline, "not ready"
            time.sleep(0.1)
        info = client.get("/v1/models/lenet5").json()
        assert info["device"] == f"cuda:{torch.cuda.current_device()}"
        screened = client.post("/v1/models/lenet5/screen", json={"tensor": x.tolist()})
        assert screened.status_code == 200, screened.text
        expected = detector.score(module, x.to(CUDA))
        got = [item["score"] for item in screened.json()["results"]]
        np.testing.assert_allclose(got, expected.scores, atol=0.05)
        assert [item["prediction"] for item in screened.json()["results"]] == expected.predictions.tolist()
        spectrum = client.post("/v1/models/lenet5/spectrum", json={"tensor": x.tolist(), "k": 5})
        assert spectrum.status_code == 200, spectrum.text
        reference = fisher_spectrum(module, x.to(CUDA), k=5, method="exact").eigenvalues.cpu().numpy()
        np.testing.assert_allclose([r["eigenvalues"] for r in spectrum.json()["results"]], reference, rtol=1e-4)
        attacked = client.post("/v1/models/lenet5/attack", json={"tensor": x[:4].tolist(), "attack": "ossa",
                                                                 "epsilon": 3.0, "output": "tensor"})
        assert attacked.status_code == 200, attacked.text
        for item in attacked.json()["results"]:
            assert item["perturbation_norm"] <= 3.0 + 1e-4


def test_jobs_on_a_cuda_worker(shipped, tmp_path):
    """A real redis-server and a real `fisher-guard worker` on the GPU: screening (the engine's scores),
    least-norm, attack and detector-training jobs all succeed there."""
    from service.jobs.redis_queue import RedisJobQueue
    from service.jobs.types import JobRequest, JobStatus

    server = shutil.which("redis-server")
    assert server, "redis-server is needed"
    models = tmp_path / "models"  # a copy: the training job writes its candidate next to the cards
    shutil.copytree(REPO / "models", models)
    port = 20000 + os.getpid() % 20000
    redis_proc = subprocess.Popen([server, "--port", str(port), "--save", "", "--appendonly", "no"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, queue_name = f"redis://127.0.0.1:{port}/0", f"fg-cuda-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "FISHER_GUARD_REDIS_URL": url, "FISHER_GUARD_JOBS_QUEUE": queue_name,
           "FISHER_GUARD_DEVICE": "cuda", "FISHER_GUARD_MODELS_DIR": str(models)}
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen([sys.executable, "-m", "service.cli", "worker", "--preload", "lenet5"],
                                  cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    queue = None
    try:
        time.sleep(0.5)
        queue = RedisJobQueue(url, Settings(redis_url=url, jobs_queue=queue_name, models_dir=models))
        requests = {
            "screen": JobRequest(type="screen", model="lenet5", dataset="mnist:test", limit=64),
            "least-norm": JobRequest(type="least-norm", model="lenet5", dataset="mnist:test", limit=8,
                                     params={"attack": "fgm", "tol": 0.01}),
            "attack": JobRequest(type="attack", model="lenet5", dataset="mnist:test", limit=8,
                                 params={"attack": "bim", "epsilon": 2.0, "options": {"steps": 5}}),
            "train-detector": JobRequest(type="train-detector", model="lenet5", params={
                "fit_dataset": "mnist:val", "fit_limit": 60, "attacks": ["fgm", "ossa"], "classifier": "gnb",
                "feature_set": "plain"}),
        }
        jobs = {name: queue.submit(request).id for name, request in requests.items()}
        deadline = time.monotonic() + 240
        for name, job_id in jobs.items():
            while not (info := queue.status(job_id)).status.finished:
                assert worker.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.1)
            assert info.status == JobStatus.succeeded, f"{name}: {info.error}\n{log.read_text()[-3000:]}"
        rows = queue.artifact(jobs["screen"]).data.decode().splitlines()
        header, rows = rows[0].split(","), [row.split(",") for row in rows[1:]]
        scores = np.array([float(row[header.index("score")]) for row in rows])
        expected = shipped["detector"].score(shipped["gpu"].module, load_mnist("test")[0][:64].to(CUDA)).scores
        assert len(scores) == 64 and np.abs(scores - expected).max() <= 0.05
        assert queue.result(jobs["least-norm"])["searched"] == 8
        assert queue.result(jobs["attack"])["attacked"] == 8
        assert Path(queue.result(jobs["train-detector"])["detector_path"]).is_file()
        assert "loaded on cuda:0" in log.read_text(), "the worker logs the device it loaded the model on"
    finally:
        if queue is not None:
            queue.close()
        worker.terminate()
        worker.wait(30)
        redis_proc.terminate()
        redis_proc.wait(10)
