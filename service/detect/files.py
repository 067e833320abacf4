"""Detector files: `<model>.detector.npz` (the compiled classifier's arrays, no pickle) and its JSON card, which
records the file's sha256 and what is needed to read it; save, find and load, with every check a load makes
(docs/decisions/detector-format.md); and activation: making a candidate the model's active detector, atomically,
with one step of rollback.

Files of a model `m` in its card's folder, once a detector has been activated:

    m.detector.json            the ACTIVE card: its `detector_file` section names the .npz it describes
                               ("file": "m.detector.<id>.npz"), and an `activation` section says when, from which
                               candidate, and which detector it replaced; replacing this file (os.replace) is the
                               one step readers see: a reader gets the old card or the new, never a mix
    m.detector.<id>.npz        the arrays, content-addressed (<id>: the first 16 hex of their sha256); written to a
                               temporary file, fsynced and renamed before any card names them
    m.detector.previous.json   the card that was active before (its file named explicitly): what a rollback restores
    m.detector.npz             the shipped form: a card without "file" describes `m.detector.npz`, so shipped and
                               hand-copied detectors keep loading unchanged
    m.detector.lock            flock'ed around an activation or a rollback (two at once are serialised)

A content-addressed .npz that neither card names any more is deleted by the next activation or rollback (the
shipped `m.detector.npz` never is). A reader that loads a card and then its file can lose that file only if two
more activations happen in between; it then fails its load, and a watcher that retries on the card's next change
(service.serving) recovers.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import io
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from service.detect.compiled import KINDS, ArraysError
from service.detect.detector import Detector
from service.detect.features import FEATURE_SETS

FORMAT_VERSION = 2  # .npz of arrays + the JSON card; 1 was the joblib pickle
LEGACY_FORMAT_VERSION = 1
LEGACY_SUFFIX = ".joblib"
FILE_KEY = "detector_file"  # the card's section that describes the .npz (what load_detector reads)
ACTIVATION_KEY = "activation"  # the active card's section: activated_at, source, previous
ID_LENGTH = 16  # hex digits of the .npz's sha256 that name a detector (its id, and its content-addressed file)
FILE_NAME = re.compile(r"[^/\\\x00]+\.npz")  # what a card's "file" may be: a .npz next to the card, no path

log = logging.getLogger(__name__)


class DetectorLoadError(ValueError):
    """A detector file is missing, unreadable, not the one its card describes, or belongs to other model weights."""


class WeightsMismatchError(DetectorLoadError):
    """The detector was trained for other model weights (its card's model sha256 differs)."""


class ActivationError(ValueError):
    """An activation or rollback that cannot be done (no previous detector to roll back to, no model name)."""


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
    """`models/x.detector.npz` (or the legacy `.joblib`) -> `models/x.detector.json`; a card (.json) is itself."""
    path = Path(path)
    if path.suffix == ".json":
        return path
    return path.with_suffix(".json") if path.suffix in (".npz", LEGACY_SUFFIX) else path.with_name(path.name + ".json")


def detector_id(sha256: str) -> str:
    """A detector's id: the first 16 hex digits of its .npz's sha256 (what the API's answers name)."""
    return sha256[:ID_LENGTH]


def active_card_path(models_dir: str | Path, model_name: str) -> Path:
    """The active detector's card of a model: `<models_dir>/<model>.detector.json` (what watchers stat)."""
    return Path(models_dir) / f"{model_name}.detector.json"


def previous_card_path(models_dir: str | Path, model_name: str) -> Path:
    """The card a rollback restores: `<models_dir>/<model>.detector.previous.json`."""
    return Path(models_dir) / f"{model_name}.detector.previous.json"


def detector_path(models_dir: str | Path, model_name: str) -> Path:
    """The detector file of a card that names none (the shipped form): `<models_dir>/<model>.detector.npz`."""
    return Path(models_dir) / f"{model_name}.detector.npz"


def find_detector(models_dir: str | Path, model_name: str) -> Path:
    """What to give `load_detector` for a model's active detector; it exists exactly when there is one: the
    active card when it names its file (an activated detector), else `detector_path`, or the legacy `.joblib` when
    only that exists (which `load_detector` then refuses unless pickles are allowed, saying how to convert it)."""
    path = detector_path(models_dir, model_name)
    card = card_path_for(path)
    if _names_its_file(card):
        return card
    legacy = path.with_suffix(LEGACY_SUFFIX)
    return legacy if not path.exists() and legacy.is_file() else path


def _names_its_file(card_path: Path) -> bool:
    try:
        spec = json.loads(card_path.read_text()).get(FILE_KEY)
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False
    return isinstance(spec, dict) and "file" in spec


@dataclass(frozen=True)
class LoadedDetector:
    """A detector with the file it was read from and that file's sha256 (`id`: its first 16 hex digits)."""

    detector: Detector
    file: Path
    sha256: str

    @property
    def id(self) -> str:
        return detector_id(self.sha256)


def load_detector(path: str | Path, model_sha256: str | None, *, allow_pickle: bool = False) -> Detector:
    """Load a detector and check that it was trained for these model weights (by sha256).

    `path` is the .npz (its card is the .json next to it) or the card itself; a card whose `detector_file` names a
    "file" describes that file in the card's folder, a card without one the .npz next to it (`x.detector.json` ->
    `x.detector.npz`). The card is read first; the .npz must have the sha256 the card records (checked before
    numpy reads it), and its arrays must describe a classifier of the recorded kind. A legacy `.joblib` is
    unpickled only with `allow_pickle=True` (unpickling runs whatever code the file holds). DetectorLoadError for
    any refusal (WeightsMismatchError when it was trained for other weights)."""
    return load_detector_file(path, model_sha256, allow_pickle=allow_pickle).detector


def load_detector_file(path: str | Path, model_sha256: str | None, *, allow_pickle: bool = False) -> LoadedDetector:
    """`load_detector`, with the file that was read and its sha256."""
    path = Path(path)
    if path.suffix == LEGACY_SUFFIX:
        if not allow_pickle:
            raise DetectorLoadError(
                f"detector {path} is in the legacy pickled format, which can run code when loaded: refused. "
                f"If you trust the file, convert it once with `fisher-guard convert-detector {path}` (or set "
                "FISHER_GUARD_ALLOW_PICKLED_DETECTORS=true)")
        detector = load_legacy_detector(path)
        _check_weights(detector.card, path, model_sha256)
        return LoadedDetector(detector, path, hashlib.sha256(path.read_bytes()).hexdigest())
    card, spec, data_path = _read_card(path)
    _check_weights(card, path, model_sha256)
    if not data_path.is_file():
        raise DetectorLoadError(f"detector file not found: {data_path} (named by its card {card_path_for(path)})")
    data = data_path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != spec["sha256"]:
        raise DetectorLoadError(f"detector file {data_path} has sha256 {digest}, but its card {card_path_for(path)} "
                                f"records {spec['sha256']}: the file changed or is not the one the card describes")
    try:
        archive = np.load(io.BytesIO(data), allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an .npz archive")
        with archive:
            arrays = {name: archive[name] for name in archive.files}
    except Exception as exc:  # not a zip, a truncated member, an object array (a pickle), ...
        raise DetectorLoadError(f"detector file {data_path} is not an archive of numeric arrays: "
                                f"{type(exc).__name__}: {exc}") from exc
    try:
        classifier = KINDS[spec["classifier"]].from_arrays(arrays)
    except ArraysError as exc:
        raise DetectorLoadError(f"detector file {data_path} does not hold a valid {spec['classifier']}: {exc}") from exc
    if len(classifier.classes_) != 2:
        raise DetectorLoadError(f"detector file {data_path} holds a classifier of {len(classifier.classes_)} "
                                "classes; a detector has two (clean, adversarial)")
    return LoadedDetector(Detector(classifier, spec["feature_set"], spec["k"], spec["threshold"], card), data_path,
                          digest)


def _read_card(path: Path) -> tuple[dict, dict, Path]:
    """The card of the detector at `path` (its .npz or its card) without its FILE_KEY section, that section,
    checked, and the .npz it describes."""
    card_path = card_path_for(path)
    if not card_path.is_file():
        if path != card_path and not path.is_file():
            raise DetectorLoadError(f"detector file not found: {path}")
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
    named = spec.get("file")
    if named is not None and not (isinstance(named, str) and FILE_NAME.fullmatch(named)):
        problems.append(f"file must name a .npz next to the card, without a path; got {named!r}")
    if problems:
        raise DetectorLoadError(f"detector card {card_path}: {'; '.join(problems)}")
    if named is not None:
        data_path = card_path.parent / named
    else:
        data_path = path if path != card_path else card_path.with_suffix(".npz")
    return card, {**spec, "threshold": float(threshold)}, data_path


def _check_weights(card: dict, path: Path, model_sha256: str | None) -> None:
    trained_for = (card.get("model") or {}).get("sha256")
    if model_sha256 is None or trained_for != model_sha256:
        name = (card.get("model") or {}).get("name", "?")
        raise WeightsMismatchError(
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


# ---- activation: a candidate becomes the active detector, atomically, with one step of rollback ----

@dataclass(frozen=True)
class ActiveDetector:
    """What an activation or a rollback left active, and what it keeps for rollback."""

    model: str
    card: Path  # the active card, <model>.detector.json
    file: Path  # the .npz it names
    id: str
    activated_at: str
    source: str  # the candidate activated, or "rollback"
    previous_file: Path | None = None  # what a rollback would restore (None: nothing)
    previous_id: str | None = None
    removed: tuple[Path, ...] = ()  # content-addressed files no card names any more, deleted

    def __str__(self) -> str:
        return f"{self.file} (detector {self.id})"

    def describe(self) -> str:
        """Lines for the CLI: what is active now, and what is kept for rollback."""
        lines = [f"active detector of {self.model}: {self.file} (detector {self.id}, activated {self.activated_at}"
                 f" from {self.source})"]
        if self.previous_file is not None:
            lines.append(f"kept for rollback: {self.previous_file} (detector {self.previous_id}); undo with "
                         f"`fisher-guard activate-detector --rollback --model {self.model}`")
        else:
            lines.append("kept for rollback: nothing (there was no active detector before)")
        lines += [f"deleted (no card names it any more): {path}" for path in self.removed]
        return "\n".join(lines)


def activate_detector(candidate: str | Path, model_card_path: str | Path, model_sha256: str, *,
                      now: datetime | None = None) -> ActiveDetector:
    """Make a candidate detector (its .npz, or its card) the active one of the model whose card is
    `model_card_path`, after every check `load_detector` makes (WeightsMismatchError when it was trained for other
    weights than `model_sha256`: the active detector is then untouched).

    Under the model's lock: the candidate's .npz is copied to its content-addressed name (temporary file, fsync,
    rename); the card that was active is kept as `<model>.detector.previous.json`, its file named explicitly; the
    new card (the candidate's, naming that file, with an `activation` section: activated_at in ISO UTC, source,
    previous) is checked by loading it, then renamed over `<model>.detector.json`: the one step that readers see.
    Content-addressed files that no card names any more are deleted. Running processes pick the change up by
    watching the active card (service.serving.refresh_detector), without a restart."""
    candidate, model_card_path = Path(candidate), Path(model_card_path)
    folder, model = model_card_path.parent, _model_name(model_card_path)
    card, spec, data_path = _read_card(candidate)
    _check_weights(card, candidate, model_sha256)  # refused before anything is written
    with _activation_lock(folder, model):
        _remove_temporaries(folder, model)
        data = data_path.read_bytes() if data_path.is_file() else b""
        digest = hashlib.sha256(data).hexdigest()
        if not data or digest != spec["sha256"]:
            load_detector(candidate, model_sha256)  # says exactly what is wrong with it
            raise DetectorLoadError(f"detector file {data_path} changed while it was being activated")
        target = folder / f"{model}.detector.{detector_id(digest)}.npz"
        if not (target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == digest):
            _write_atomically(target, data)
        previous = _explicit(_read_json(active_card_path(folder, model)), model)
        activation = {"activated_at": _iso(now), "source": str(candidate),
                      "previous": _reference(previous)}
        new_card = {**card, FILE_KEY: {**spec, "file": target.name}, ACTIVATION_KEY: activation}
        return _swap(folder, model, new_card, previous, model_sha256)


def rollback_detector(model_card_path: str | Path, model_sha256: str, *, now: datetime | None = None
                      ) -> ActiveDetector:
    """Make the previous detector of a model (`<model>.detector.previous.json`) the active one again, and the
    active one the previous: the same atomic swap as `activate_detector`, so a rollback can itself be rolled back.
    ActivationError when there is no previous detector; WeightsMismatchError when it was trained for other
    weights (nothing changes then)."""
    model_card_path = Path(model_card_path)
    folder, model = model_card_path.parent, _model_name(model_card_path)
    with _activation_lock(folder, model):
        _remove_temporaries(folder, model)
        restored = _explicit(_read_json(previous_card_path(folder, model)), model)
        if restored is None:
            raise ActivationError(f"model {model!r} has no previous detector to roll back to "
                                  f"({previous_card_path(folder, model).name} is missing or not a detector card): "
                                  "nothing was changed")
        current = _explicit(_read_json(active_card_path(folder, model)), model)
        restored[ACTIVATION_KEY] = {"activated_at": _iso(now), "source": "rollback", "previous": _reference(current)}
        return _swap(folder, model, restored, current, model_sha256)


def _swap(folder: Path, model: str, new_card: dict, previous: dict | None, model_sha256: str) -> ActiveDetector:
    """With the model's lock held: stage `new_card` and load it (every check), keep `previous` as the previous
    card (or none), rename the staged card over the active one, and delete the files no card names."""
    active, kept = active_card_path(folder, model), previous_card_path(folder, model)
    staged = folder / f".{model}.detector.staged.json"
    try:
        _write_staged(staged, _card_text(new_card))
        loaded = load_detector_file(staged, model_sha256)
        if previous is not None:
            _write_atomically(kept, _card_text(previous))
        else:
            kept.unlink(missing_ok=True)
        os.replace(staged, active)  # the one step readers see
        _fsync_folder(folder)
    finally:
        staged.unlink(missing_ok=True)
        removed = _remove_unnamed(folder, model)
    activation = new_card[ACTIVATION_KEY]
    previous_id = detector_id(previous[FILE_KEY]["sha256"]) if previous is not None else None
    log.info("model %s: detector %s active (%s), previous %s", model, loaded.id, activation["source"],
             previous_id or "none")
    return ActiveDetector(model, active, loaded.file, loaded.id, activation["activated_at"], activation["source"],
                          folder / previous[FILE_KEY]["file"] if previous is not None else None, previous_id,
                          removed)


def _model_name(model_card_path: Path) -> str:
    name = (_read_json(model_card_path) or {}).get("name")
    if not isinstance(name, str) or not name:
        raise ActivationError(f"model card {model_card_path} names no model")
    return name


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("%s is not readable JSON (%s): treated as absent", path, exc)
        return None
    return value if isinstance(value, dict) else None


def _explicit(card: dict | None, model: str) -> dict | None:
    """A detector card (format 2) with its file named explicitly (`<model>.detector.npz` when it named none), or
    None for no card, or one that does not describe a detector file."""
    spec = (card or {}).get(FILE_KEY)
    if not isinstance(spec, dict) or spec.get("format") != FORMAT_VERSION or not isinstance(spec.get("sha256"), str):
        return None
    return {**card, FILE_KEY: {**spec, "file": spec.get("file") or f"{model}.detector.npz"}}  # type: ignore[dict-item]


def _reference(card: dict | None) -> dict | None:
    """How an activation section names the detector it replaced."""
    if card is None:
        return None
    return {"id": detector_id(card[FILE_KEY]["sha256"]), "file": card[FILE_KEY]["file"]}


def _iso(now: datetime | None) -> str:
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _card_text(card: dict) -> bytes:
    return (json.dumps(card, indent=2) + "\n").encode()


@contextmanager
def _activation_lock(folder: Path, model: str) -> Iterator[None]:
    """The model's activation lock (flock on `<model>.detector.lock`): one activation or rollback at a time, across
    processes."""
    fd = os.open(folder / f"{model}.detector.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file next to `path`, fsync it, and rename it over `path`: readers see the old
    file or the new one, and after a crash one of the two."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _write_staged(path: Path, data: bytes) -> None:
    """Write a private file (the lock is held; nobody reads it) and fsync it, before it is renamed into place."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_temporaries(folder: Path, model: str) -> None:
    """Left by an activation that died mid-way (the lock is held: no other one is writing)."""
    for path in folder.glob(f".{glob.escape(model)}.detector.*"):
        if path.name.endswith(".tmp") or path.name == f".{model}.detector.staged.json":
            path.unlink(missing_ok=True)


def _remove_unnamed(folder: Path, model: str) -> tuple[Path, ...]:
    """Delete the model's content-addressed .npz files that neither the active nor the previous card names."""
    named = set()
    for card_path in (active_card_path(folder, model), previous_card_path(folder, model)):
        card = _explicit(_read_json(card_path), model)
        if card is None and card_path.exists():
            return ()  # a card that cannot be read: delete nothing
        if card is not None:
            named.add(card[FILE_KEY]["file"])
    pattern = re.compile(re.escape(model) + rf"\.detector\.[0-9a-f]{{{ID_LENGTH}}}\.npz")
    removed = []
    for path in sorted(folder.glob(f"{glob.escape(model)}.detector.*.npz")):
        if pattern.fullmatch(path.name) and path.name not in named:
            path.unlink(missing_ok=True)
            removed.append(path)
    return tuple(removed)
