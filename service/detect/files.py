"""Detector files: `<model>.detector.npz` (the compiled classifier's arrays, no pickle) and its JSON card, which
records the file's sha256 and what is needed to read it; save, find and load, with every check a load makes
(docs/decisions/detector-format.md)."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np

from service.detect.compiled import KINDS, ArraysError
from service.detect.detector import Detector
from service.detect.features import FEATURE_SETS

FORMAT_VERSION = 2  # .npz of arrays + the JSON card; 1 was the joblib pickle
LEGACY_FORMAT_VERSION = 1
LEGACY_SUFFIX = ".joblib"
FILE_KEY = "detector_file"  # the card's section that describes the .npz (what load_detector reads)


class DetectorLoadError(ValueError):
    """A detector file is missing, unreadable, not the one its card describes, or belongs to other model weights."""


def save_detector(detector: Detector, path: str | Path) -> tuple[Path, Path]:
    """Write the classifier's arrays to `<path>` (.npz, no pickle) and the card, with the file's sha256 and
    what the arrays need to be read, next to it (`.npz` -> `.json`); returns both paths."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"detector files end in .npz; got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **detector.classifier.to_arrays())
    data = buffer.getvalue()
    path.write_bytes(data)
    card = {**detector.card, FILE_KEY: {
        "format": FORMAT_VERSION, "sha256": hashlib.sha256(data).hexdigest(), "classifier": detector.classifier.kind,
        "feature_set": detector.feature_set, "k": detector.k, "threshold": detector.threshold}}
    card_path = card_path_for(path)
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    return path, card_path




def card_path_for(path: str | Path) -> Path:
    """`models/x.detector.npz` (or the legacy `.joblib`) -> `models/x.detector.json`."""
    path = Path(path)
    return path.with_suffix(".json") if path.suffix in (".npz", LEGACY_SUFFIX) else path.with_name(path.name + ".json")


def detector_path(models_dir: str | Path, model_name: str) -> Path:
    """Where the active detector of a model lives (and is written): `<models_dir>/<model>.detector.npz`."""
    return Path(models_dir) / f"{model_name}.detector.npz"


def find_detector(models_dir: str | Path, model_name: str) -> Path:
    """The detector file to load for a model: `detector_path`, or the legacy `.joblib` when only that exists (which
    `load_detector` then refuses unless pickles are allowed, saying how to convert it)."""
    path = detector_path(models_dir, model_name)
    legacy = path.with_suffix(LEGACY_SUFFIX)
    return legacy if not path.exists() and legacy.is_file() else path


def load_detector(path: str | Path, model_sha256: str | None, *, allow_pickle: bool = False) -> Detector:
    """Load a detector and check that it was trained for these model weights (by sha256).

    The card is read first; the .npz must have the sha256 the card records (checked before numpy reads it), and
    its arrays must describe a classifier of the recorded kind. A legacy `.joblib` is unpickled only with
    `allow_pickle=True` (unpickling runs whatever code the file holds). DetectorLoadError for any refusal."""
    path = Path(path)
    if path.suffix == LEGACY_SUFFIX:
        if not allow_pickle:
            raise DetectorLoadError(
                f"detector {path} is in the legacy pickled format, which can run code when loaded: refused. "
                f"If you trust the file, convert it once with `fisher-guard convert-detector {path}` (or set "
                "FISHER_GUARD_ALLOW_PICKLED_DETECTORS=true)")
        detector = load_legacy_detector(path)
        _check_weights(detector.card, path, model_sha256)
        return detector
    card, spec = _read_card(path)
    _check_weights(card, path, model_sha256)
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != spec["sha256"]:
        raise DetectorLoadError(f"detector file {path} has sha256 {digest}, but its card {card_path_for(path)} "
                                f"records {spec['sha256']}: the file changed or is not the one the card describes")
    try:
        archive = np.load(io.BytesIO(data), allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an .npz archive")
        with archive:
            arrays = {name: archive[name] for name in archive.files}
    except Exception as exc:  # not a zip, a truncated member, an object array (a pickle), ...
        raise DetectorLoadError(f"detector file {path} is not an archive of numeric arrays: "
                                f"{type(exc).__name__}: {exc}") from exc
    try:
        classifier = KINDS[spec["classifier"]].from_arrays(arrays)
    except ArraysError as exc:
        raise DetectorLoadError(f"detector file {path} does not hold a valid {spec['classifier']}: {exc}") from exc
    if len(classifier.classes_) != 2:
        raise DetectorLoadError(f"detector file {path} holds a classifier of {len(classifier.classes_)} classes; "
                                "a detector has two (clean, adversarial)")
    return Detector(classifier, spec["feature_set"], spec["k"], spec["threshold"], card)


def _read_card(path: Path) -> tuple[dict, dict]:
    """The card of the .npz at `path` without its FILE_KEY section, and that section, checked."""
    if not path.is_file():
        raise DetectorLoadError(f"detector file not found: {path}")
    card_path = card_path_for(path)
    if not card_path.is_file():
        raise DetectorLoadError(f"detector card {card_path} not found: a detector file is loaded only with its "
                                "card, which records the file's sha256")
    try:
        card = json.loads(card_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DetectorLoadError(f"detector card {card_path} is not valid JSON: {exc}") from exc
    spec = card.pop(FILE_KEY, None) if isinstance(card, dict) else None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT_VERSION:
        raise DetectorLoadError(f"detector card {card_path} does not describe a detector file of format "
                                f"{FORMAT_VERSION} (no {FILE_KEY!r} section, or another format)")
    sha, kind, k, threshold = (spec.get(key) for key in ("sha256", "classifier", "k", "threshold"))
    problems = []
    if not (isinstance(sha, str) and re.fullmatch("[0-9a-f]{64}", sha)):
        problems.append(f"sha256 of the file must be 64 hex digits, got {sha!r}")
    if kind not in KINDS:
        problems.append(f"unknown classifier kind {kind!r} (known: {', '.join(KINDS)})")
    if spec.get("feature_set") not in FEATURE_SETS:
        problems.append(f"unknown feature set {spec.get('feature_set')!r}")
    if type(k) is not int or k < 1:
        problems.append(f"k must be a positive integer, got {k!r}")
    if type(threshold) not in (int, float):
        problems.append(f"threshold must be a number, got {threshold!r}")
    if problems:
        raise DetectorLoadError(f"detector card {card_path}: {'; '.join(problems)}")
    return card, {**spec, "threshold": float(threshold)}


def _check_weights(card: dict, path: Path, model_sha256: str | None) -> None:
    trained_for = (card.get("model") or {}).get("sha256")
    if model_sha256 is None or trained_for != model_sha256:
        name = (card.get("model") or {}).get("name", "?")
        raise DetectorLoadError(
            f"detector {path} was trained for model {name!r} with weights sha256 {trained_for}, "
            f"but the loaded model's weights have sha256 {model_sha256}: retrain it with `fisher-guard train-detector`"
        )


def load_legacy_detector(path: str | Path) -> Detector:
    """Unpickle a format-1 `.joblib` detector, compiled on the way. Unpickling runs whatever code the file holds:
    only for files you trust. The model weights are not checked here (`load_detector` does; a converted file keeps
    the sha256 its card records)."""
    import joblib

    path = Path(path)
    if not path.is_file():
        raise DetectorLoadError(f"detector file not found: {path}")
    try:
        payload = joblib.load(path)
    except Exception as exc:  # any unreadable / truncated / foreign file
        raise DetectorLoadError(
            f"detector file {path} is corrupt or not a detector: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != LEGACY_FORMAT_VERSION or "classifier" not in payload:
        raise DetectorLoadError(f"detector file {path} is not a fisher-guard detector (format {LEGACY_FORMAT_VERSION})")
    if payload.get("feature_set") not in FEATURE_SETS:
        raise DetectorLoadError(f"detector file {path} has an unknown feature set {payload.get('feature_set')!r}")
    try:
        return Detector(payload["classifier"], payload["feature_set"], int(payload["k"]),
                        float(payload["threshold"]), dict(payload.get("card") or {}))
    except TypeError as exc:  # a classifier without a compiled form
        raise DetectorLoadError(f"detector file {path}: {exc}") from exc
