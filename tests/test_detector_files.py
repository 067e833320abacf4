"""Detector files without pickle: every classifier kind round-trips through .npz + card with sklearn's scores, the
card's sha256 is checked before numpy reads the file, crafted or pickled arrays are refused, legacy .joblib files
load only on opt-in (and convert), and the shipped detectors give the scores of the joblib files they came from."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import joblib
import numpy as np
import pytest
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.naive_bayes import GaussianNB
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from service.cli import main as cli_main
from service.config import REPO_ROOT, Settings, get_settings
from service.detect.compiled import compile_classifier
from service.detect.detector import Detector
from service.detect.files import (
    FILE_KEY,
    DetectorLoadError,
    card_path_for,
    detector_path,
    find_detector,
    load_detector,
    save_detector,
)
from service.jobs import model_cache
from service.zoo.registry import find_card, sha256_file, weights_path

SHA = "ab" * 32  # the model weights the test detectors claim
CARD = {"kind": "fisher-guard detector", "model": {"name": "m", "sha256": SHA}, "validation": {"auc": 0.9}}
GOLDEN = Path(__file__).parent / "data" / "detector_scores.npz"
CLASSIFIERS = {
    "random_forest": lambda: RandomForestClassifier(n_estimators=15, max_depth=4, random_state=0),
    "gaussian_nb": GaussianNB,
    "logistic_regression": lambda: LogisticRegression(max_iter=1000),
    "pipeline": lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
}
RAN: list[str] = []


def data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training rows, labels and fresh rows (wider, so that some land far out) on unequal feature scales."""
    rng = np.random.default_rng(seed)
    scales = np.geomspace(0.1, 10, 20)
    x = rng.normal(size=(400, 20)) * scales
    y = x[:, 0] / scales[0] + x[:, 5] / scales[5] + rng.normal(size=400) > 0
    return x, y, rng.normal(size=(300, 20)) * scales * 3


def fitted(name: str):
    x, y, _ = data()
    return CLASSIFIERS[name]().fit(x, y)


def saved(tmp_path: Path, name: str = "random_forest") -> Path:
    path, _ = save_detector(Detector(fitted(name), "plain", 20, 0.375, dict(CARD)), detector_path(tmp_path, "m"))
    return path


def rewrite(path: Path, arrays: dict, **savez) -> None:
    """Replace the arrays of a saved detector and record the new file's sha256 in its card, as a crafted pair."""
    with path.open("wb") as f:
        np.savez(f, **arrays, **savez)
    record_sha256(path)


def record_sha256(path: Path) -> None:
    card = json.loads(card_path_for(path).read_text())
    card[FILE_KEY]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    card_path_for(path).write_text(json.dumps(card))


@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_every_classifier_kind_round_trips_with_sklearns_scores(tmp_path, name):
    estimator = fitted(name)
    x, _, fresh = data()
    rows = np.concatenate([fresh, x[:50], fresh.astype(np.float32)[:50]])
    path = saved(tmp_path, name)
    loaded = load_detector(path, SHA)
    expected = estimator.predict_proba(rows)[:, 1]
    if name == "gaussian_nb":  # its own softmax: equal to ~1e-14, not bit for bit
        np.testing.assert_allclose(loaded.score_features(rows), expected, rtol=0, atol=1e-12)
    else:
        np.testing.assert_array_equal(loaded.score_features(rows), expected)
    assert (loaded.feature_set, loaded.k, loaded.threshold, loaded.card) == ("plain", 20, 0.375, CARD)
    spec = json.loads(card_path_for(path).read_text())[FILE_KEY]
    assert spec["classifier"] == loaded.classifier.kind
    assert spec["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    with np.load(path, allow_pickle=False) as archive:  # numeric arrays only
        assert all(archive[key].dtype.kind in "biuf" for key in archive.files)


def test_classifiers_without_a_compiled_form_are_refused():
    x, y, _ = data()
    with pytest.raises(TypeError, match="no compiled form for SVC"):
        compile_classifier(SVC().fit(x, y))
    with pytest.raises(TypeError, match="only binary"):
        compile_classifier(LogisticRegression(max_iter=1000).fit(x, (x[:, 0] > 0).astype(int) + (x[:, 1] > 0)))


def test_sha256_mismatch_is_refused_before_numpy_reads_the_file(tmp_path, monkeypatch):
    path = saved(tmp_path)
    path.write_bytes(path.read_bytes() + b"\0")
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("np.load ran on a file of the wrong sha256"))
    with pytest.raises(DetectorLoadError, match="has sha256 .* but its card .* records"):
        load_detector(path, SHA)


def test_weights_mismatch_is_refused_before_the_file_is_read(tmp_path, monkeypatch):
    path = saved(tmp_path)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("the detector file was read"))
    with pytest.raises(DetectorLoadError, match="trained for model 'm' with weights sha256"):
        load_detector(path, "cd" * 32)


@pytest.mark.parametrize(("change", "message"), [
    (lambda a: a["left"].__setitem__((0, 0), 10**6), "'left' holds indices outside"),
    (lambda a: a["right"].__setitem__((1, 2), -1), "'right' holds indices outside"),
    (lambda a: a["feature"].__setitem__((0, 0), 20), "'feature' holds indices outside"),
    (lambda a: a.__setitem__("depth", np.int64(10**9)), "depth = 1000000000 lies outside"),
    (lambda a: a.__setitem__("value", a["value"][:, :-1]), "'value' has shape"),
    (lambda a: a.__setitem__("left", a["left"].astype(np.float64)), "'left' is float64"),
    (lambda a: a["threshold"].__setitem__((0, 0), np.nan), "'threshold' holds non-finite"),
    (lambda a: a.pop("classes"), r"missing \['classes'\]"),
    (lambda a: a.update(classes=np.zeros(1), value=a["value"][:, :, :1]), "classifier of 1 classes"),
    (lambda a: a.__setitem__("extra", np.zeros(3)), r"unexpected \['extra'\]"),
])
def test_crafted_forest_arrays_are_refused_at_load(tmp_path, change, message):
    path = saved(tmp_path)
    arrays = load_detector(path, SHA).classifier.to_arrays()
    arrays = {key: np.array(value) for key, value in arrays.items()}
    change(arrays)
    rewrite(path, arrays)
    with pytest.raises(DetectorLoadError, match=message):
        load_detector(path, SHA)


@pytest.mark.parametrize(("name", "change", "message"), [
    ("gaussian_nb", lambda a: a["var"].__setitem__((0, 0), 0.0), "variances must be positive"),
    ("gaussian_nb", lambda a: a.__setitem__("theta", a["theta"][:, :3]), "'var' has shape"),
    ("pipeline", lambda a: a.__setitem__("coef", np.zeros((2, 20))), r"'coef' has shape \(2, 20\)"),
    ("pipeline", lambda a: a.__setitem__("mean", np.zeros(19)), "'mean' has shape"),
])
def test_crafted_arrays_of_the_other_kinds_are_refused(tmp_path, name, change, message):
    path = saved(tmp_path, name)
    arrays = {key: np.array(value) for key, value in load_detector(path, SHA).classifier.to_arrays().items()}
    change(arrays)
    rewrite(path, arrays)
    with pytest.raises(DetectorLoadError, match=message):
        load_detector(path, SHA)


class Payload:
    """Unpickling this calls `_ran`: the test fails if it ever does."""

    def __reduce__(self):
        return _ran, ()


def _ran() -> None:
    RAN.append("unpickled")


def test_a_file_holding_a_pickle_is_refused_without_running_it(tmp_path):
    path = saved(tmp_path)
    arrays = dict(load_detector(path, SHA).classifier.to_arrays())
    arrays["classes"] = np.array([Payload(), Payload()], dtype=object)
    rewrite(path, arrays, allow_pickle=True)
    with pytest.raises(DetectorLoadError, match="not an archive of numeric arrays"):
        load_detector(path, SHA)
    assert RAN == []


@pytest.mark.parametrize(("card", "message"), [
    (None, "card .* not found"),
    ("{not json", "not valid JSON"),
    (json.dumps(CARD), "no 'detector_file' section"),
    (json.dumps({**CARD, FILE_KEY: {"format": 1}}), "or another format"),
    (json.dumps({**CARD, FILE_KEY: {"format": 2, "sha256": "x", "classifier": "svm", "feature_set": "nope", "k": 0,
                                    "threshold": "high"}}),
     "64 hex digits.*unknown classifier kind 'svm'.*unknown feature set 'nope'.*positive integer.*a number"),
])
def test_a_missing_or_bad_card_is_refused(tmp_path, card, message):
    path = saved(tmp_path)
    if card is None:
        card_path_for(path).unlink()
    else:
        card_path_for(path).write_text(card)
    with pytest.raises(DetectorLoadError, match=message):
        load_detector(path, SHA)


def test_a_file_that_is_not_an_archive_is_refused(tmp_path):
    path = saved(tmp_path)
    for content in (b"not an npz file", np.lib.format.magic(1, 0) + b"garbage"):
        path.write_bytes(content)
        record_sha256(path)
        with pytest.raises(DetectorLoadError, match="not an archive of numeric arrays"):
            load_detector(path, SHA)


def legacy_file(folder: Path) -> tuple[Path, LogisticRegression]:
    """A format-1 detector as `Detector.save` wrote it before: a joblib pickle of the sklearn estimator + metadata."""
    estimator = fitted("logistic_regression")
    path = folder / "m.detector.joblib"
    joblib.dump({"format": 1, "classifier": estimator, "feature_set": "plain", "k": 20, "threshold": 0.375,
                 "card": dict(CARD)}, path, compress=3)
    card_path_for(path).write_text(json.dumps(CARD))
    return path, estimator


def test_legacy_joblib_loads_only_on_explicit_opt_in(tmp_path):
    path, estimator = legacy_file(tmp_path)
    assert find_detector(tmp_path, "m") == path  # only the legacy file exists: it is found, then refused
    with pytest.raises(DetectorLoadError, match="legacy pickled format.*convert-detector"):
        load_detector(path, SHA)
    loaded = load_detector(path, SHA, allow_pickle=True)
    _, _, fresh = data()
    np.testing.assert_array_equal(loaded.score_features(fresh), estimator.predict_proba(fresh)[:, 1])
    with pytest.raises(DetectorLoadError, match="trained for model 'm'"):
        load_detector(path, "cd" * 32, allow_pickle=True)


def test_the_setting_opts_the_worker_engine_in(tmp_path, monkeypatch):
    """The in-process job backend configures the jobs' model cache from its settings, the pickle opt-in too."""
    from service.jobs.local_backend import InProcessJobQueue

    legacy_file(tmp_path)
    model = SimpleNamespace(name="m", card_path=tmp_path / "m.json", sha256=SHA)
    try:
        InProcessJobQueue(Settings(models_dir=tmp_path)).close()
        assert model_cache.source().allow_pickled_detectors is False
        with pytest.raises(DetectorLoadError, match="legacy pickled format"):
            load_detector(find_detector(tmp_path, model.name), model.sha256, allow_pickle=False)
        InProcessJobQueue(Settings(models_dir=tmp_path, allow_pickled_detectors=True)).close()
        assert model_cache.source().allow_pickled_detectors is True
        assert load_detector(find_detector(tmp_path, model.name), model.sha256,
                             allow_pickle=model_cache.source().allow_pickled_detectors).threshold == 0.375
    finally:
        model_cache.configure(get_settings().model_folders(), "auto")


def test_convert_detector_writes_the_pickle_free_format(tmp_path, capsys):
    path, estimator = legacy_file(tmp_path)
    assert cli_main(["convert-detector", str(path)]) == 0
    new = path.with_suffix(".npz")
    assert str(new) in capsys.readouterr().out and find_detector(tmp_path, "m") == new
    card = json.loads(card_path_for(new).read_text())
    assert card.pop(FILE_KEY)["classifier"] == "logistic_regression" and card == CARD  # the old card, kept
    _, _, fresh = data()
    np.testing.assert_array_equal(load_detector(new, SHA).score_features(fresh), estimator.predict_proba(fresh)[:, 1])
    assert cli_main(["convert-detector", str(tmp_path / "missing.detector.joblib")]) == 1


@pytest.mark.parametrize("model", ["vgg-shallow"])  # lenet5's detector was retrained (hardened) as .npz since
def test_shipped_detectors_give_the_scores_of_the_joblib_files_they_were_converted_from(model):
    """tests/data/detector_scores.npz: rows and the scores of the old `models/<model>.detector.joblib` (sklearn's
    predict_proba, equal to the old compiled forest's), written before the conversion: random rows spread over the
    range of the forest's thresholds on each feature."""
    card, card_path = find_card(model)
    detector = load_detector(detector_path(REPO_ROOT / "models", model), sha256_file(weights_path(card, card_path)))
    assert detector.classifier.kind == "random_forest" and detector.card["test"]["auc"] > 0.9
    with np.load(GOLDEN, allow_pickle=False) as golden:
        groups = [key.removesuffix("__scores") for key in golden.files if key.startswith(f"{model}__")
                  and key.endswith("__scores")]
        assert groups
        for group in groups:
            np.testing.assert_array_equal(detector.score_features(golden[f"{group}__features"]),
                                          golden[f"{group}__scores"])
    assert not list((REPO_ROOT / "models").glob("*.joblib"))
