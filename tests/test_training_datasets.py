"""`fisher-guard train-model --dataset`: a builtin small CNN on sklearn's 8x8 digits and torchvision's ResNet-18 on
RGB digits; the cards load through the registry and give the trained model's logits; the MNIST path is as before."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import torch

from service.cli import build_parser
from service.cli import main as cli_main
from service.commands.train_model import mnist_config
from service.config import get_settings
from service.data.datasets import LabelledImages
from service.data.sources import rgb_digits, sklearn_digits, write_npz
from service.zoo.architectures import SmallCNN
from service.zoo.cards import ModelCard
from service.zoo.registry import load_model, sha256_file
from service.zoo.training import TrainConfig, accuracy, dataset_splits, train_on_dataset

MODELS = Path(__file__).resolve().parent.parent / "models"


def tensors(part: LabelledImages) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(part.images), torch.from_numpy(part.labels)


def assert_same_logits(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * max(1.0, float(expected.abs().max())))


@pytest.fixture(scope="module")
def digits() -> LabelledImages:
    return sklearn_digits()


def test_small_cnn_takes_any_size_from_8x8() -> None:
    for shape in ((1, 8, 8), (3, 32, 32), (1, 28, 28), (2, 9, 13)):
        net = SmallCNN(num_classes=7, in_channels=shape[0]).eval()
        assert net(torch.rand(2, *shape)).shape == (2, 7)


def test_small_cnn_on_sklearn_digits_from_the_cli(tmp_path: Path, digits: LabelledImages) -> None:
    npz = write_npz(digits, tmp_path / "digits.npz")
    out = tmp_path / "models"
    args = ["train-model", "--dataset", str(npz), "--architecture", "small-cnn", "--name", "digits-cnn",
            "--epochs", "4", "--seed", "1", "--out", str(out), "--no-progress"]
    assert cli_main(args) == 0
    card_path = out / "digits-cnn.json"
    card = ModelCard.read(card_path)
    loaded = load_model(card_path, device="cpu")
    assert loaded.sha256 == card.sha256 == sha256_file(out / "digits-cnn.pt")
    assert (card.framework, card.architecture, card.input_shape) == ("builtin", "small-cnn", [1, 8, 8])
    assert card.class_names == [str(k) for k in range(10)] and card.num_classes == 10
    assert len(card.mean) == len(card.std) == 1 and 0 < card.mean[0] < 1

    # the card's accuracy is the loaded model's on the test part of the recorded split, well above chance
    _, _, test = dataset_splits(digits, 0.15, 0.15, seed=1)
    measured = accuracy(loaded.module, *tensors(test))
    assert abs(measured - card.test_accuracy) <= 5e-5
    assert card.test_accuracy > 0.9, card.test_accuracy  # 4 epochs gave 0.978 (seed 1; seed 2: 0.974)
    assert f"{len(test.labels)} images" in card.test_split and str(npz) in card.test_split

    # the same run through the Python API gives the same network, hence the same logits
    module, scores = train_on_dataset(digits, name="digits-cnn", architecture="small-cnn", epochs=4, seed=1,
                                      progress=False)
    assert scores["test_accuracy"] == pytest.approx(measured)
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_same_logits(loaded.module(x), module(x))  # the registry folded the BatchNorm layers: float rounding

    # the recorded command reproduces the weights bit for bit
    again = tmp_path / "again"
    command = shlex.split(card.training_command.replace(str(out), str(again)))
    assert command[:2] == ["fisher-guard", "train-model"]
    assert cli_main([*command[1:], "--no-progress"]) == 0
    assert ModelCard.read(again / "digits-cnn.json").sha256 == card.sha256


def test_resnet18_on_rgb_digits_loads_through_the_registry(tmp_path: Path) -> None:
    data = rgb_digits(size=32, seed=0)
    npz = write_npz(data, tmp_path / "rgb.npz")
    out = tmp_path / "models"
    args = ["train-model", "--dataset", str(npz), "--architecture", "torchvision:resnet18", "--epochs", "1",
            "--limit", "160", "--batch-size", "32", "--out", str(out), "--no-progress"]
    assert cli_main(args) == 0
    card_path = out / "resnet18-rgb.json"  # the default name: <architecture>-<dataset>
    card = ModelCard.read(card_path)
    assert (card.framework, card.architecture, card.input_shape) == ("torchvision", "resnet18", [3, 32, 32])
    assert card.activation is None and len(card.mean) == 3 and "--limit 160" in card.training_command
    loaded = load_model(card_path, device="cpu")  # its BatchNorm folded into the convolutions
    module, _ = train_on_dataset(data, name="resnet18-rgb", architecture="resnet18", framework="torchvision",
                                 epochs=1, batch_size=32, limit=160, progress=False)
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_same_logits(loaded.module(x), module(x))


def test_server_side_names(tmp_path: Path, digits: LabelledImages, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "datasets"
    write_npz(digits, folder / "digits.npz")
    monkeypatch.setenv("FISHER_GUARD_DATASET_FOLDERS", str(folder))
    get_settings.cache_clear()
    try:
        for spec, name, shape in (("data:digits", "small-cnn-digits", [1, 8, 8]),
                                  ("mnist:val", "small-cnn-mnist-val", [1, 28, 28])):
            assert cli_main(["train-model", "--dataset", spec, "--epochs", "1", "--limit", "120", "--out",
                             str(tmp_path / "m"), "--no-progress"]) == 0
            card = ModelCard.read(tmp_path / "m" / f"{name}.json")  # the default name: <architecture>-<dataset>
            assert card.input_shape == shape and spec in card.test_split
            assert f"--dataset {spec} " in card.training_command
            assert "subset of 120 images" in card.test_split
            load_model(tmp_path / "m" / f"{name}.json", device="cpu")
    finally:
        get_settings.cache_clear()


@pytest.mark.parametrize(("extra", "message"), [
    (["--architecture", "small-cnn"], "only with --dataset"),
    (["--val-fraction", "0.2"], "only with --dataset"),
    (["--name", "my-model"], "without --dataset one of"),
])
def test_dataset_options_need_a_dataset(extra: list[str], message: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["train-model", *extra, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("extra", "message"), [
    (["--architecture", "no-such-net"], "unknown architecture"),
    (["--architecture", "torchvision:resnet18"], "does not take images of shape [1, 8, 8]"),
    (["--adversarial"], "does not combine with --dataset"),
    (["--test-fraction", "0.6", "--val-fraction", "0.5"], "add up to less than 1"),
    (["--name", "../evil"], "model name"),
    (["--arch-arg", "bogus=1"], "does not take the arguments"),
    (["--architecture", "torchvision:resnet18", "--arch-arg", "weights=DEFAULT"], "set by the trainer"),
])
def test_bad_dataset_runs_are_refused(extra: list[str], message: str, tmp_path: Path, digits: LabelledImages,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    npz = write_npz(digits, tmp_path / "digits.npz")
    code = cli_main(["train-model", "--dataset", str(npz), *extra, "--epochs", "1", "--out", str(tmp_path / "m"),
                     "--no-progress"])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m").exists() or not list((tmp_path / "m").iterdir())


def test_the_mnist_commands_are_as_before() -> None:
    assert TrainConfig().command(Path("models")) == ("fisher-guard train-model --name lenet5 --epochs 15 --seed 0 "
                                                     "--threads 1 --out models")
    parser = build_parser()
    for path in sorted(MODELS.glob("*.json")):
        card = ModelCard.read(path) if "detector" not in path.name else None
        if card is None or card.training_command is None:
            continue
        args = parser.parse_args(shlex.split(card.training_command)[1:])
        assert args.dataset is None and args.name == card.name
        assert mnist_config(args).command(args.out) == card.training_command
