"""Model cards and the registry: shipped models load and keep their accuracy; bad cards fail clearly; user
models (torchvision architecture + weights, TorchScript) load and take [0, 1] pixels; training runs."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from service.cli import main as cli_main
from service.config import REPO_ROOT, get_settings
from service.data.mnist import load_mnist
from service.zoo.architectures import Normalize
from service.zoo.cards import ModelCard
from service.zoo.registry import (
    ModelLoadError,
    ModelNotFoundError,
    list_cards,
    load_model,
    resolve_device,
    sha256_file,
)
from service.zoo.train_config import SHIPPED_MODELS
from service.zoo.training import TrainConfig, accuracy, train_and_save

MODELS = REPO_ROOT / "models"


@pytest.fixture
def user_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A user model folder, set through the environment as a deployment would; the registry searches the
    folders that the settings name."""
    folder = tmp_path / "user-models"
    folder.mkdir()
    monkeypatch.setenv("FISHER_GUARD_USER_MODELS_DIR", str(folder))
    get_settings.cache_clear()
    assert get_settings().model_folders()[-1] == folder
    yield folder
    get_settings.cache_clear()


def copy_card(name: str, dest: Path, **changes: object) -> Path:
    """A copy of a shipped card and its weights in `dest`, with some fields changed."""
    card = json.loads((MODELS / f"{name}.json").read_text())
    shutil.copy(MODELS / card["weights"], dest / card["weights"])
    card.update(changes)
    path = dest / f"{card['name']}.json"
    path.write_text(json.dumps(card))
    return path


@pytest.mark.parametrize("name", SHIPPED_MODELS)
def test_shipped_model_loads_and_keeps_its_accuracy(name: str) -> None:
    card = ModelCard.read(MODELS / f"{name}.json")
    assert (MODELS / card.weights).stat().st_size < 5_000_000
    loaded = load_model(name, device="cpu")
    assert loaded.name == name and loaded.sha256 == card.sha256 == sha256_file(MODELS / card.weights)
    assert not loaded.module.training
    assert not any(p.requires_grad for p in loaded.module.parameters())
    assert card.training_command and card.training_command.startswith("fisher-guard train-model")
    assert card.activation == ("elu" if name.endswith("-adv") else "relu")
    images, labels = load_mnist("test")
    assert abs(accuracy(loaded.module, images, labels) - card.test_accuracy) <= 0.005


def test_list_cards_has_the_shipped_models() -> None:
    names = {card.name for card in list_cards()}
    assert set(SHIPPED_MODELS) <= names


def test_load_by_card_path_and_auto_device() -> None:
    loaded = load_model(MODELS / "lenet5.json", device="auto")
    assert loaded.device == resolve_device("auto")
    assert loaded.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("device, message", [
    ("gpu", "unknown device 'gpu'"), ("mps", "device 'mps' is not supported"),
    (f"cuda:{torch.cuda.device_count()}", "is not available: torch sees"),  # one past the last GPU, or none
])
def test_bad_device_is_refused_with_the_reason(device: str, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        load_model("lenet5", device=device)


def test_unknown_name_is_not_found() -> None:
    with pytest.raises(ModelNotFoundError, match="no model named 'nope'"):
        load_model("nope")


def test_missing_weights_file(tmp_path: Path) -> None:
    path = copy_card("lenet5", tmp_path, weights="absent.pt")
    with pytest.raises(ModelLoadError, match=r"absent\.pt .*does not exist"):
        load_model(path, device="cpu")


def test_wrong_sha256(tmp_path: Path) -> None:
    path = copy_card("lenet5", tmp_path, sha256="0" * 64)
    with pytest.raises(ModelLoadError, match=r"lenet5\.pt has sha256 .* expects 0000"):
        load_model(path, device="cpu")


def test_changed_weights_file_fails_its_sha256(tmp_path: Path) -> None:
    path = copy_card("lenet5", tmp_path)
    with open(tmp_path / "lenet5.pt", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelLoadError, match="sha256"):
        load_model(path, device="cpu")


def test_weights_that_do_not_fit_the_architecture(tmp_path: Path) -> None:
    path = copy_card("lenet5", tmp_path, architecture="vgg-shallow")
    with pytest.raises(ModelLoadError, match=r"lenet5\.pt does not fit architecture vgg-shallow"):
        load_model(path, device="cpu")


def test_unknown_architecture_and_bad_card(tmp_path: Path) -> None:
    path = copy_card("lenet5", tmp_path, architecture="lenet7")
    with pytest.raises(ModelLoadError, match="unknown builtin architecture 'lenet7'"):
        load_model(path, device="cpu")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**json.loads(path.read_text()), "class_names": ["a", "b"]}))
    with pytest.raises(ModelLoadError, match=r"bad\.json is not valid"):
        load_model(bad, device="cpu")


def test_card_with_wrong_number_of_classes(tmp_path: Path) -> None:
    path = copy_card("lenet5", tmp_path, num_classes=5, class_names=list("abcde"))
    with pytest.raises(ModelLoadError, match="does not fit"):
        load_model(path, device="cpu")


def user_card(folder: Path, name: str, framework: str, architecture: str, weights: Path) -> Path:
    card = ModelCard(name=name, framework=framework, architecture=architecture, weights=weights.name,
                     sha256=sha256_file(weights), input_shape=[3, 32, 32], mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3],
                     class_names=[f"c{i}" for i in range(10)], num_classes=10, notes="random weights, for tests")
    path = folder / f"{name}.json"
    card.write(path)
    return path


def test_torchvision_user_model(user_dir: Path) -> None:
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.get_model("resnet18", weights=None, num_classes=10).eval()
    torch.save(net.state_dict(), user_dir / "my-resnet.pt")
    user_card(user_dir, "my-resnet", "torchvision", "resnet18", user_dir / "my-resnet.pt")

    folders = get_settings().model_folders()
    assert "my-resnet" in {c.name for c in list_cards(folders)} and "my-resnet" not in {c.name for c in list_cards()}
    loaded = load_model("my-resnet", device="cpu", folders=folders)
    x = torch.rand(2, 3, 32, 32)
    expected = net(Normalize([0.5, 0.4, 0.3], [0.2, 0.25, 0.3])(x))
    logits = loaded.module(x)
    assert logits.shape == (2, 10)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)


def test_torchvision_weights_of_another_architecture(user_dir: Path) -> None:
    import torchvision

    net = torchvision.models.get_model("resnet18", weights=None, num_classes=10)
    torch.save(net.state_dict(), user_dir / "r.pt")
    path = user_card(user_dir, "r", "torchvision", "mobilenet_v2", user_dir / "r.pt")
    with pytest.raises(ModelLoadError, match=r"r\.pt does not fit architecture mobilenet_v2"):
        load_model(path, device="cpu")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_user_model(user_dir: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 30 * 30, 10)).eval()
    torch.jit.script(net).save(str(user_dir / "scripted.ts"))
    path = user_card(user_dir, "scripted", "torchscript", "torchscript", user_dir / "scripted.ts")
    loaded = load_model(path, device="cpu")
    x = torch.rand(3, 3, 32, 32)
    expected = net(Normalize([0.5, 0.4, 0.3], [0.2, 0.25, 0.3])(x))
    torch.testing.assert_close(loaded.module(x), expected)
    assert loaded.sha256 == sha256_file(user_dir / "scripted.ts")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_without_sha256_is_refused_before_loading(user_dir: Path, monkeypatch) -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).eval()
    torch.jit.script(net).save(str(user_dir / "unsigned.ts"))
    path = user_card(user_dir, "unsigned", "torchscript", "torchscript", user_dir / "unsigned.ts")
    path.write_text(json.dumps({**json.loads(path.read_text()), "sha256": None}))
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("torch.jit.load ran without a sha256"))
    with pytest.raises(ModelLoadError, match=r"no sha256 for its TorchScript file unsigned\.ts"):
        load_model(path, device="cpu")


def test_torchscript_file_that_is_not_one(user_dir: Path) -> None:
    (user_dir / "junk.ts").write_bytes(b"not a model")
    path = user_card(user_dir, "junk", "torchscript", "torchscript", user_dir / "junk.ts")
    with pytest.raises(ModelLoadError, match=r"junk\.ts is not a TorchScript module"):
        load_model(path, device="cpu")


def test_short_training_writes_a_loadable_card(tmp_path: Path) -> None:
    config = TrainConfig(name="lenet5", epochs=1, seed=3, limit=256)
    card = train_and_save(config, tmp_path, progress=False)
    loaded = load_model(tmp_path / "lenet5.json", device="cpu")
    assert loaded.sha256 == card.sha256
    images, labels = load_mnist("test")
    measured = accuracy(loaded.module, images[:256], labels[:256])
    assert abs(measured - card.test_accuracy) <= 5e-5  # the card rounds to 4 digits
    assert "--limit 256" in card.training_command and card.seed == 3
    again = train_and_save(config, tmp_path / "again", progress=False)
    assert again.sha256 == card.sha256  # deterministic with the seed


def test_short_adversarial_training_from_the_cli(tmp_path: Path) -> None:
    code = cli_main(["train-model", "--name", "lenet5", "--adversarial", "--epochs", "1", "--limit", "128",
                     "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    card = ModelCard.read(tmp_path / "lenet5-adv.json")
    assert card.activation == "elu" and card.name == "lenet5-adv" and "FGM" in card.notes
    assert load_model(tmp_path / "lenet5-adv.json", device="cpu").module(torch.rand(2, 1, 28, 28)).shape == (2, 10)
