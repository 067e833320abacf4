"""Shared fixtures: small models (float32 and float64 copies, eval mode) and seeded random inputs.

Models:
- `mlp`:   Flatten -> Linear(50, 32) -> tanh -> Linear(32, 7) on (2, 5, 5) inputs, K = 7.
- `cnn`:   conv + BatchNorm (random running statistics) + ReLU, twice, average pool, dropout, Linear on
           (3, 8, 8) inputs, K = 10. In eval mode BatchNorm uses its running statistics and dropout is off.
- `lenet`: service.zoo.architectures.LeNet5 with random weights on (1, 28, 28) inputs, K = 10.
- `digits`: softmax regression fitted with L-BFGS on sklearn's 8x8 digits (pixels in [0, 1]), with 64 held-out images.

The tests run single-threaded: their tensors are tiny and the machine is shared.
"""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from service.zoo.architectures import LeNet5

torch.set_num_threads(1)
pytest.register_assert_rewrite("jobs_support", "api_support", "support")


@dataclass
class Case:
    """A model in eval mode, its input shape and number of classes, and a batch of seeded random inputs."""

    name: str
    model: nn.Module
    shape: tuple[int, ...]
    num_classes: int
    images: Tensor

    def double(self) -> Case:
        """The same model and inputs in float64."""
        return Case(self.name + "-f64", frozen(copy.deepcopy(self.model).double()), self.shape, self.num_classes,
                    self.images.double())


def frozen(model: nn.Module) -> nn.Module:
    """Eval mode, no parameter gradients: how the engine expects a classifier."""
    return model.eval().requires_grad_(False)


def make_mlp() -> nn.Module:
    torch.manual_seed(1)
    return frozen(nn.Sequential(nn.Flatten(), nn.Linear(50, 32), nn.Tanh(), nn.Linear(32, 7)))


def make_cnn() -> nn.Module:
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AvgPool2d(2), nn.Flatten(), nn.Dropout(0.5), nn.Linear(8 * 4 * 4, 10),
    )
    for layer in model:
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_mean.uniform_(-0.2, 0.2)
            layer.running_var.uniform_(0.5, 2.0)
            layer.weight.data.uniform_(0.5, 1.5)
            layer.bias.data.uniform_(-0.1, 0.1)
    return frozen(model)


def make_lenet() -> nn.Module:
    torch.manual_seed(3)
    return frozen(LeNet5(num_classes=10))


def random_images(shape: tuple[int, ...], n: int, seed: int) -> Tensor:
    """n images in the interior of the [0, 1] box (so that small steps are not clipped)."""
    gen = torch.Generator().manual_seed(seed)
    return 0.1 + 0.8 * torch.rand(n, *shape, generator=gen)


@pytest.fixture(scope="session")
def mlp_case() -> Case:
    return Case("mlp", make_mlp(), (2, 5, 5), 7, random_images((2, 5, 5), 4, 10))


@pytest.fixture(scope="session")
def cnn_case() -> Case:
    return Case("cnn", make_cnn(), (3, 8, 8), 10, random_images((3, 8, 8), 4, 11))


@pytest.fixture(scope="session")
def lenet_case() -> Case:
    return Case("lenet", make_lenet(), (1, 28, 28), 10, random_images((1, 28, 28), 3, 12))


@pytest.fixture(scope="session", params=["mlp", "cnn", "lenet"])
def case(request, mlp_case: Case, cnn_case: Case, lenet_case: Case) -> Case:
    """Each small float32 model in turn."""
    return {"mlp": mlp_case, "cnn": cnn_case, "lenet": lenet_case}[request.param]


@pytest.fixture(scope="session", params=["mlp", "cnn", "lenet"])
def case64(request, mlp_case: Case, cnn_case: Case, lenet_case: Case) -> Case:
    """Each small model as a float64 copy."""
    return {"mlp": mlp_case, "cnn": cnn_case, "lenet": lenet_case}[request.param].double()


@dataclass
class Digits:
    """A small classifier trained on sklearn's 8x8 digits (pixels scaled to [0, 1]) and held-out images."""

    model: nn.Module
    images: Tensor
    labels: Tensor


def load_digits_fast() -> tuple[Tensor, Tensor]:
    """sklearn's 8x8 digits (1797 images in [0, 1], labels), read from the file scikit-learn ships; this
    skips importing scikit-learn itself, which takes seconds on a loaded machine."""
    spec = importlib.util.find_spec("sklearn")
    assert spec is not None and spec.submodule_search_locations, "scikit-learn is not installed"
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    data = np.loadtxt(path, delimiter=",", dtype=np.float32)
    x = torch.from_numpy(data[:, :64]).reshape(-1, 1, 8, 8) / 16.0
    return x, torch.from_numpy(data[:, 64]).long()


@pytest.fixture(scope="session")
def digits() -> Digits:
    """Softmax regression fitted with L-BFGS on 1500 digits (well under a second); about 95% accurate on the
    held-out digits, of which the first 64 correctly classified are kept."""
    x, y = load_digits_fast()
    torch.manual_seed(4)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=100, history_size=10)
    train_x, train_y = x[:1500], y[:1500]

    def closure() -> Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(train_x), train_y) + 1e-3 * model[1].weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    model = frozen(model)
    test_x, test_y = x[1500:], y[1500:]
    with torch.no_grad():
        correct = model(test_x).argmax(-1) == test_y
    assert correct.float().mean() > 0.9
    keep = correct.nonzero().squeeze(1)[:64]
    return Digits(model, test_x[keep], test_y[keep])


# ---- API fixtures (service/api tests) ----

API_MODEL = "lenet5"
API_MODEL_BARE = "lenet5-bare"  # the same weights without a detector


@pytest.fixture(scope="session")
def api_models_dir(tmp_path_factory):
    """A model folder for the API tests: the shipped lenet5 (card + weights) with its shipped detector, and
    `lenet5-bare`: the same weights, no detector. A shipped detector that is missing or does not load for the
    shipped weights fails the tests: it is what the service ships."""
    import json
    import shutil
    from pathlib import Path

    from service.detect.files import DetectorLoadError, card_path_for, detector_path, load_detector
    from service.zoo.registry import sha256_file

    shipped = Path(__file__).resolve().parent.parent / "models"
    folder = tmp_path_factory.mktemp("api-models")
    card = json.loads((shipped / f"{API_MODEL}.json").read_text())
    weights = shipped / card["weights"]
    shutil.copy(weights, folder / card["weights"])
    sha = sha256_file(weights)
    card["sha256"] = sha
    (folder / f"{API_MODEL}.json").write_text(json.dumps(card))
    (folder / f"{API_MODEL_BARE}.json").write_text(json.dumps({**card, "name": API_MODEL_BARE}))
    source, target = detector_path(shipped, API_MODEL), detector_path(folder, API_MODEL)
    try:
        load_detector(source, sha)
    except DetectorLoadError as exc:
        pytest.fail(f"the shipped detector of {API_MODEL} does not load: {exc}")
    shutil.copy(source, target)
    shutil.copy(card_path_for(source), card_path_for(target))
    return folder


# ---- the API app (tests/test_api*.py; helpers in tests/api_support.py) ----

@pytest.fixture(scope="module")
def settings(api_models_dir):
    from api_support import BARE, MODEL, PAYLOAD_LIMIT

    from service.config import Settings

    return Settings(models_dir=api_models_dir, user_models_dir=None, device="cpu", serve_models=[MODEL, BARE],
                    max_batch_size=32, max_payload_bytes=PAYLOAD_LIMIT, max_k=20, max_epsilon=10.0,
                    max_attack_batch=4, max_attack_steps=50, batch_max_size=16, batch_max_wait_ms=2.0)


@pytest.fixture(scope="module")
def app(settings):
    from service.api import create_app

    return create_app(settings)


@pytest.fixture(scope="module")
def client(app):
    from fastapi.testclient import TestClient

    with TestClient(app, raise_server_exceptions=False) as test_client:
        from api_support import wait_ready

        wait_ready(test_client)
        yield test_client
        # teardown: whatever the module's tests sent, the app answered no request with a 500
        assert 'status="500"' not in test_client.get("/metrics").text


@pytest.fixture(scope="module")
def engine(api_models_dir):
    """The same model and detector, loaded outside the app: the reference answers."""
    from api_support import MODEL

    from service.detect.files import detector_path, load_detector
    from service.zoo.registry import load_model

    loaded = load_model(api_models_dir / f"{MODEL}.json", device="cpu")
    return loaded.module, load_detector(detector_path(api_models_dir, MODEL), loaded.sha256), loaded.sha256


@pytest.fixture(scope="module")
def reference(client, app, engine):
    """The engine's screening of a batch under the API worker's kernel settings (threads, oneDNN on or off by
    batch size: see ModelWorker.with_threads), which change float rounding and so, rarely, a tree's leaf."""
    from api_support import MODEL

    module, detector, _ = engine
    worker = app.state.models[MODEL].worker
    return lambda images: worker.with_threads(lambda batch: detector.score(module, batch), images)


# ---- Redis (job queue tests) ----

def start_redis(port: int, *args: str):
    """A real redis-server on `port` (no persistence unless `args` ask for it), once it answers PING; the tests
    fail (never skip) without one."""
    import shutil
    import subprocess
    import time

    import redis

    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server): the job tests need a real Redis")
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return proc
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"redis-server did not start on port {port}")
            time.sleep(0.05)


@pytest.fixture(scope="session")
def redis_url():
    """The session's redis-server on a free port."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = start_redis(port)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)
