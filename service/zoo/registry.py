"""Load models by name or card path: builtin architectures, torchvision architectures with the user's weights,
or TorchScript files. Every loaded model takes [0, 1] pixels (the card's mean/std is applied inside it).

Nothing is downloaded: weights come only from the files that the cards name, checked against their sha256.
Folders and devices are arguments (default: the shipped models, 'auto'): the entry points pass the settings'.
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError
from torch import Tensor, nn

from service.zoo.architectures import ARCHITECTURES, Normalize
from service.zoo.cards import ModelCard
from service.zoo.fold import fold_batchnorm

log = logging.getLogger(__name__)
SHIPPED_MODELS = Path(__file__).resolve().parents[2] / "models"  # the default folder: the models that ship


class ModelLoadError(ValueError):
    """A model cannot be loaded; the message names the file and the problem."""


class ModelNotFoundError(ModelLoadError):
    """No card with that name in the model folders."""


class PixelSpaceModel(nn.Module):
    """A user's network behind the card's normalisation, so that it takes [0, 1] pixels like the builtin ones."""

    def __init__(self, net: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.normalize(x))


@dataclass
class LoadedModel:
    """A model ready for inference: eval mode, no parameter gradients, on `device`."""

    name: str
    card: ModelCard
    module: nn.Module
    device: torch.device
    sha256: str
    card_path: Path | None = None


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU. A CUDA device gets its index ('cuda' -> 'cuda:0'), so that
    responses name the GPU that answered; one that is not there is refused."""
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(f"unknown device {str(device)!r}: use 'auto', 'cpu' or 'cuda[:i]'") from exc
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ModelLoadError(f"device {str(device)!r} is not supported: use 'auto', 'cpu' or 'cuda[:i]'")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = torch.cuda.current_device() if dev.index is None and count else dev.index
    if count == 0 or not 0 <= (index or 0) < count:
        raise ModelLoadError(f"device {str(device)!r} is not available: torch sees {count} CUDA device(s)")
    return torch.device("cuda", index)


def use_full_float32() -> None:
    """Float32 convolutions in float32 on CUDA, not TF32 (cuDNN's default, 10 mantissa bits): with TF32,
    ResNet-18's exact top eigenvalue was 1.2e-3 off the dense reference instead of 5e-7, and no faster (H200,
    bench/results/spectrum-cuda-tf32.md); the detector's features would drift off those it was trained on.
    Process-wide, like the flags themselves; set by every CUDA model load."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def card_files(folders: Sequence[Path] = (SHIPPED_MODELS,)) -> list[tuple[ModelCard, Path]]:
    """Every valid model card in `folders`, in folder order, with its path; other JSON files there (detector
    cards) are skipped."""
    found: list[tuple[ModelCard, Path]] = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.json")):
            try:
                found.append((ModelCard.read(path), path))
            except (ValidationError, ValueError, OSError) as exc:
                log.debug("skipping %s: not a model card (%s)", path, exc)
    return found


def cards_by_name(folders: Sequence[Path] = (SHIPPED_MODELS,)) -> dict[str, tuple[ModelCard, Path]]:
    """The card of every model that `load_model` can load by name from `folders` (the first folder wins a
    name clash), with its path."""
    found: dict[str, tuple[ModelCard, Path]] = {}
    for card, path in card_files(folders):
        found.setdefault(card.name, (card, path))
    return found


def list_cards(folders: Sequence[Path] = (SHIPPED_MODELS,)) -> list[ModelCard]:
    """The cards of every model that `load_model` can load by name from `folders`."""
    return [card for card, _ in cards_by_name(folders).values()]


def find_card(name_or_path: str | Path, folders: Sequence[Path] = (SHIPPED_MODELS,)) -> tuple[ModelCard, Path]:
    """A card by path (a `Path` to its JSON file) or by registry name (a `str`). A name resolves only through
    the registry's folders: a name that happens to be a file (a user's 'Dockerfile') is never read."""
    if isinstance(name_or_path, Path):
        return read_card(name_or_path)
    cards = cards_by_name(folders)
    if name_or_path in cards:
        return cards[name_or_path]
    known = ", ".join(sorted(cards)) or "none"
    shown = name_or_path if len(name_or_path) <= 64 else name_or_path[:64] + "..."
    raise ModelNotFoundError(f"no model named {shown!r} (known: {known})")


def read_card(path: Path) -> tuple[ModelCard, Path]:
    """The card in a JSON file named by the operator (CLI, settings), with its path."""
    if not path.is_file():
        raise ModelNotFoundError(f"model card {path} does not exist")
    try:
        return ModelCard.read(path), path
    except (ValidationError, ValueError) as exc:
        raise ModelLoadError(f"model card {path} is not valid: {exc}") from exc


def weights_path(card: ModelCard, card_path: Path) -> Path:
    """The card's weights file, relative to the card's folder unless absolute."""
    path = Path(card.weights)
    return path if path.is_absolute() else card_path.parent / path


def _state_dict(path: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure means an unusable file
        raise ModelLoadError(f"weights file {path} could not be read as a PyTorch state dict: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"weights file {path} holds a {type(state).__name__}, not a state dict")
    return state


def _load_weights(net: nn.Module, path: Path, what: str) -> None:
    try:
        net.load_state_dict(_state_dict(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:4])
        raise ModelLoadError(f"weights file {path} does not fit architecture {what}: {detail}") from exc


def _build(card: ModelCard, path: Path, device: torch.device) -> nn.Module:
    channels = card.input_shape[0]
    if card.framework == "builtin":
        if card.architecture not in ARCHITECTURES:
            raise ModelLoadError(f"model card {card.name!r} names unknown builtin architecture {card.architecture!r} "
                                 f"(known: {', '.join(ARCHITECTURES)})")
        net = ARCHITECTURES[card.architecture](num_classes=card.num_classes, activation=card.activation or "relu",
                                               in_channels=channels, mean=card.mean, std=card.std,
                                               **card.architecture_kwargs)
        _load_weights(net, path, card.architecture)
        return net
    if card.framework == "torchvision":
        import torchvision

        if card.architecture not in torchvision.models.list_models():
            raise ModelLoadError(f"model card {card.name!r} names unknown torchvision architecture "
                                 f"{card.architecture!r}")
        net = torchvision.models.get_model(card.architecture, weights=None, num_classes=card.num_classes,
                                           **card.architecture_kwargs)
        _load_weights(net, path, card.architecture)
        return PixelSpaceModel(net, card.mean, card.std)
    data = path.read_bytes()  # the bytes checked are the bytes loaded: loading TorchScript can run code
    if hashlib.sha256(data).hexdigest() != (card.sha256 or "").lower():
        raise ModelLoadError(f"TorchScript file {path} does not have the sha256 its card records (it changed "
                             "while loading, or the card gives none): refused")
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated upstream but still what users export
            warnings.simplefilter("ignore", FutureWarning)
            scripted = torch.jit.load(io.BytesIO(data), map_location=device)
    except Exception as exc:  # torch.jit raises several error types
        raise ModelLoadError(f"weights file {path} is not a TorchScript module: {exc}") from exc
    return PixelSpaceModel(scripted, card.mean, card.std)


def _check_output(module: nn.Module, card: ModelCard, path: Path, device: torch.device) -> None:
    """One forward pass on a blank image: the model must accept the card's input shape and give K logits."""
    try:
        with torch.no_grad():
            out = module(torch.zeros(1, *card.input_shape, device=device))
    except Exception as exc:  # any failure here means the card and the model disagree
        raise ModelLoadError(f"model {path} fails on an input of the card's shape {card.input_shape}: {exc}") from exc
    if not isinstance(out, Tensor) or tuple(out.shape) != (1, card.num_classes):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ModelLoadError(f"model {path} gives output {shape} but the card expects {card.num_classes} logits")


def load_model(name_or_path: str | Path, device: str | torch.device = "auto",
               folders: Sequence[Path] = (SHIPPED_MODELS,)) -> LoadedModel:
    """Load a model by registry name or card path, check its weights' sha256, and return it ready for inference."""
    card, card_path = find_card(name_or_path, folders)
    path = weights_path(card, card_path)
    if not path.is_file():
        raise ModelLoadError(f"weights file {path} named by model card {card_path} does not exist")
    if card.framework == "torchscript" and not card.sha256:
        raise ModelLoadError(f"model card {card_path} gives no sha256 for its TorchScript file {path.name}: "
                             "loading TorchScript can run code, so the file is loaded only when the card records "
                             f"its sha256 (add \"sha256\": the output of `sha256sum {path.name}`, for a file "
                             "from a source you trust)")
    digest = sha256_file(path)
    if card.sha256 is not None and digest != card.sha256.lower():
        raise ModelLoadError(f"weights file {path} has sha256 {digest}, but model card {card_path} "
                             f"expects {card.sha256}: the file changed or is the wrong one")
    dev = resolve_device(device)
    if dev.type == "cuda":
        use_full_float32()
    module = _build(card, path, dev).to(dev).eval().requires_grad_(False)
    _check_output(module, card, path, dev)
    example = torch.rand(2, *card.input_shape, generator=torch.Generator().manual_seed(0)).to(dev)
    folded = fold_batchnorm(module, example)  # served models stay in eval mode: BatchNorm is a fixed affine map
    if folded:
        log.debug("model %s: folded %d BatchNorm layers into their convolutions", card.name, folded)
    return LoadedModel(name=card.name, card=card, module=module, device=dev, sha256=digest, card_path=card_path)
