"""Fitted sklearn classifiers as plain numeric arrays: evaluated with numpy, saved and loaded without pickle.

Each class gives the same `predict_proba` as the estimator it was compiled from, `to_arrays()` (numeric arrays
only: a detector file is `np.savez` of them) and `from_arrays()`, which checks names, shapes, dtypes and index
ranges, so that a crafted file fails at load with ArraysError rather than at the first request. `KINDS` maps the
kind name a detector's card records to its class; `compile_classifier` compiles a fitted sklearn estimator.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
from scipy.special import expit
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.naive_bayes import GaussianNB
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler


class ArraysError(ValueError):
    """Arrays that do not describe a classifier of the kind they claim."""


class CompiledClassifier(Protocol):
    """What every compiled classifier offers; `sklearn_types` are the fitted estimators it compiles."""

    kind: ClassVar[str]
    sklearn_types: ClassVar[tuple[type, ...]]
    n_features: int
    classes_: np.ndarray

    @classmethod
    def from_sklearn(cls, estimator: Any) -> CompiledClassifier: ...

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> CompiledClassifier: ...

    def to_arrays(self) -> dict[str, np.ndarray]: ...

    def predict_proba(self, features: np.ndarray) -> np.ndarray: ...


def _names(arrays: Mapping[str, np.ndarray], required: set[str], optional: frozenset[str] = frozenset()) -> None:
    missing, extra = required - set(arrays), set(arrays) - required - optional
    if missing or extra:
        raise ArraysError(f"arrays: missing {sorted(missing)}, unexpected {sorted(extra)}")


def _take(arrays: Mapping[str, np.ndarray], name: str, kinds: str, ndim: int) -> np.ndarray:
    """Array `name`, of `ndim` dimensions and a dtype kind in `kinds` ('b' bool, 'i'/'u' integer, 'f' float)."""
    array = np.asarray(arrays[name])
    if array.dtype.kind not in kinds or array.ndim != ndim:
        raise ArraysError(f"array {name!r} is {array.dtype} of shape {array.shape}: expected {ndim} dimensions of "
                          f"dtype kind {'/'.join(kinds)}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ArraysError(f"array {name!r} holds non-finite values")
    return array


def _count(arrays: Mapping[str, np.ndarray], name: str, low: int, high: int | None = None) -> int:
    value = int(_take(arrays, name, "iu", 0))
    if value < low or (high is not None and value > high):
        raise ArraysError(f"{name} = {value} lies outside [{low}, {'inf' if high is None else high}]")
    return value


def _shape(name: str, array: np.ndarray, shape: tuple[int, ...]) -> None:
    if array.shape != shape:
        raise ArraysError(f"array {name!r} has shape {array.shape}, expected {shape}")


def _float_rows(features: np.ndarray, n_features: int) -> np.ndarray:
    """The features as sklearn's input checks leave them: float32 and float64 kept, anything else float64."""
    x = np.asarray(features)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    _check_rows(x, n_features)
    return x


def _check_rows(x: np.ndarray, n_features: int) -> None:
    if x.ndim != 2 or x.shape[1] != n_features:
        raise ValueError(f"expected features of shape (N, {n_features}), got {x.shape}")


@dataclass(eq=False)
class CompiledForest:
    """A RandomForestClassifier's trees packed into (n_trees, n_nodes) arrays and evaluated level by level.

    sklearn's `predict_proba` walks each tree in Python-level loops (~0.1 ms per tree and call, whatever the
    batch); our trees are shallow (depth <= 5), so evaluating every tree at once, one level per step, costs a few
    array operations. Same answer as sklearn's: features compared in float32 against the float64 thresholds,
    per-tree leaf class fractions averaged over the trees. A leaf points at itself, so every tree takes `depth`
    steps.
    """

    kind: ClassVar[str] = "random_forest"
    sklearn_types: ClassVar[tuple[type, ...]] = (RandomForestClassifier,)

    feature: np.ndarray  # (n_trees, n_nodes) int64: the feature compared at each node (0 at leaves)
    threshold: np.ndarray  # (n_trees, n_nodes) float64: go left when feature <= threshold
    left: np.ndarray  # (n_trees, n_nodes) int64: child nodes (the node itself at leaves)
    right: np.ndarray
    value: np.ndarray  # (n_trees, n_nodes, n_classes) float64: class fractions at each node
    depth: int
    n_features: int
    classes_: np.ndarray

    @classmethod
    def from_sklearn(cls, forest: RandomForestClassifier) -> CompiledForest:
        trees = [estimator.tree_ for estimator in forest.estimators_]
        width = max(tree.node_count for tree in trees)
        n = len(trees)
        feature = np.zeros((n, width), dtype=np.int64)
        threshold = np.zeros((n, width), dtype=np.float64)
        left = np.zeros((n, width), dtype=np.int64)
        right = np.zeros((n, width), dtype=np.int64)
        value = np.zeros((n, width, forest.n_classes_), dtype=np.float64)
        for i, tree in enumerate(trees):
            count = tree.node_count
            leaf = tree.children_left[:count] == -1
            feature[i, :count] = np.where(leaf, 0, tree.feature[:count])
            threshold[i, :count] = tree.threshold[:count]
            left[i, :count] = np.where(leaf, np.arange(count), tree.children_left[:count])
            right[i, :count] = np.where(leaf, np.arange(count), tree.children_right[:count])
            values = tree.value[:count, 0, :]
            value[i, :count] = values / values.sum(axis=1, keepdims=True)
        depth = max(estimator.get_depth() for estimator in forest.estimators_)
        return cls(feature, threshold, left, right, value, depth, int(forest.n_features_in_), forest.classes_)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"feature": self.feature, "threshold": self.threshold, "left": self.left, "right": self.right,
                "value": self.value, "depth": np.int64(self.depth), "n_features": np.int64(self.n_features),
                "classes": self.classes_}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> CompiledForest:
        _names(arrays, {"feature", "threshold", "left", "right", "value", "depth", "n_features", "classes"})
        feature, left, right = (_take(arrays, name, "iu", 2).astype(np.int64) for name in ("feature", "left", "right"))
        threshold = _take(arrays, "threshold", "f", 2).astype(np.float64)
        value = _take(arrays, "value", "f", 3).astype(np.float64)
        classes = _take(arrays, "classes", "biuf", 1)
        n_trees, width = feature.shape
        if n_trees == 0 or width == 0:
            raise ArraysError(f"a forest needs at least one tree of one node; got shape {feature.shape}")
        for name, array in (("threshold", threshold), ("left", left), ("right", right)):
            _shape(name, array, feature.shape)
        _shape("value", value, (n_trees, width, len(classes)))
        n_features = _count(arrays, "n_features", 1)
        depth = _count(arrays, "depth", 0, width - 1)
        for name, array, bound in (("feature", feature, n_features), ("left", left, width), ("right", right, width)):
            if array.min() < 0 or array.max() >= bound:
                raise ArraysError(f"array {name!r} holds indices outside [0, {bound})")
        return cls(feature, threshold, left, right, value, depth, n_features, classes)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """(N, n_classes) class probabilities, equal to the forest's own `predict_proba`."""
        x = np.asarray(features, dtype=np.float32)
        _check_rows(x, self.n_features)
        n_trees = self.feature.shape[0]
        rows = np.arange(n_trees)[:, None]
        node = np.zeros((n_trees, x.shape[0]), dtype=np.int64)
        samples = np.arange(x.shape[0])[None, :]
        for _ in range(self.depth):
            goes_left = x[samples, self.feature[rows, node]] <= self.threshold[rows, node]
            node = np.where(goes_left, self.left[rows, node], self.right[rows, node])
        return self.value[rows, node].mean(axis=0)


@dataclass(eq=False)
class CompiledGaussianNB:
    """GaussianNB: per-class feature means and variances and class priors; the joint log-likelihood as sklearn
    computes it, then a softmax shifted by its row maximum (stable where the likelihoods underflow)."""

    kind: ClassVar[str] = "gaussian_nb"
    sklearn_types: ClassVar[tuple[type, ...]] = (GaussianNB,)

    theta: np.ndarray  # (n_classes, n_features) means
    var: np.ndarray  # (n_classes, n_features) variances (> 0)
    class_prior: np.ndarray  # (n_classes,)
    classes_: np.ndarray

    @property
    def n_features(self) -> int:
        return self.theta.shape[1]

    @classmethod
    def from_sklearn(cls, model: GaussianNB) -> CompiledGaussianNB:
        return cls(model.theta_, model.var_, model.class_prior_, model.classes_)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"theta": self.theta, "var": self.var, "class_prior": self.class_prior, "classes": self.classes_}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> CompiledGaussianNB:
        _names(arrays, {"theta", "var", "class_prior", "classes"})
        theta, var = _take(arrays, "theta", "f", 2), _take(arrays, "var", "f", 2)
        prior, classes = _take(arrays, "class_prior", "f", 1), _take(arrays, "classes", "biuf", 1)
        if theta.shape[0] == 0 or theta.shape[1] == 0:
            raise ArraysError(f"array 'theta' has shape {theta.shape}: no classes or no features")
        _shape("var", var, theta.shape)
        _shape("class_prior", prior, theta.shape[:1])
        _shape("classes", classes, theta.shape[:1])
        if (var <= 0).any() or (prior < 0).any():
            raise ArraysError("variances must be positive and class priors non-negative")
        return cls(theta.astype(np.float64), var.astype(np.float64), prior.astype(np.float64), classes)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """(N, n_classes) posterior class probabilities (sklearn's within ~1e-14)."""
        x = _float_rows(features, self.n_features)
        joint = []
        for i in range(len(self.classes_)):
            n_ij = -0.5 * np.sum(np.log(2.0 * np.pi * self.var[i, :]))
            n_ij = n_ij - 0.5 * np.sum(((x - self.theta[i, :]) ** 2) / self.var[i, :], axis=1)
            joint.append(np.log(self.class_prior[i]) + n_ij)
        jll = np.stack(joint, axis=1)
        exp = np.exp(jll - jll.max(axis=1, keepdims=True))
        return exp / exp.sum(axis=1, keepdims=True)


@dataclass(eq=False)
class CompiledLogistic:
    """Binary LogisticRegression, optionally after a StandardScaler (sklearn's Pipeline of the two): decision
    x @ coef.T + intercept on (x - mean) / scale, probability its sigmoid, in sklearn's order of operations."""

    kind: ClassVar[str] = "logistic_regression"
    sklearn_types: ClassVar[tuple[type, ...]] = (LogisticRegression, Pipeline)

    coef: np.ndarray  # (1, n_features)
    intercept: np.ndarray  # (1,)
    classes_: np.ndarray  # (2,)
    mean: np.ndarray | None = None  # (n_features,): the scaler's, when it centres
    scale: np.ndarray | None = None  # (n_features,): the scaler's, when it scales

    @property
    def n_features(self) -> int:
        return self.coef.shape[1]

    @classmethod
    def from_sklearn(cls, model: LogisticRegression | Pipeline) -> CompiledLogistic:
        scaler = None
        if isinstance(model, Pipeline):
            steps = [step for _, step in model.steps]
            if len(steps) != 2 or not isinstance(steps[0], StandardScaler) \
                    or not isinstance(steps[1], LogisticRegression):
                raise TypeError(f"only Pipeline(StandardScaler, LogisticRegression) compiles; got {model!r}")
            scaler, model = steps
        if len(model.classes_) != 2:
            raise TypeError(f"only binary logistic regression compiles; this one has {len(model.classes_)} classes")
        mean = scaler.mean_ if scaler is not None and scaler.with_mean else None
        scale = scaler.scale_ if scaler is not None and scaler.with_std else None
        return cls(model.coef_, model.intercept_, model.classes_, mean, scale)

    def to_arrays(self) -> dict[str, np.ndarray]:
        optional = {"mean": self.mean, "scale": self.scale}
        return {"coef": self.coef, "intercept": self.intercept, "classes": self.classes_} | {
            name: array for name, array in optional.items() if array is not None}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> CompiledLogistic:
        _names(arrays, {"coef", "intercept", "classes"}, frozenset({"mean", "scale"}))
        coef, intercept = _take(arrays, "coef", "f", 2), _take(arrays, "intercept", "f", 1)
        classes = _take(arrays, "classes", "biuf", 1)
        if coef.shape[0] != 1 or coef.shape[1] == 0:
            raise ArraysError(f"array 'coef' has shape {coef.shape}, expected (1, n_features)")
        _shape("intercept", intercept, (1,))
        _shape("classes", classes, (2,))
        optional = {}
        for name in ("mean", "scale"):
            if name in arrays:
                optional[name] = _take(arrays, name, "f", 1).astype(np.float64)
                _shape(name, optional[name], (coef.shape[1],))
        if "scale" in optional and (optional["scale"] == 0).any():
            raise ArraysError("array 'scale' holds zeros")
        return cls(coef.astype(np.float64), intercept.astype(np.float64), classes, **optional)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """(N, 2) probabilities [1 - p, p], p = sigmoid(decision), equal to sklearn's."""
        x = _float_rows(features, self.n_features)
        if self.mean is not None or self.scale is not None:
            x = x.copy()  # as StandardScaler.transform does: in place, in the input's float dtype
            if self.mean is not None:
                x -= self.mean.astype(x.dtype)
            if self.scale is not None:
                x /= self.scale.astype(x.dtype)
        p = expit((x @ self.coef.T + self.intercept).reshape(-1))
        return np.stack([1 - p, p], axis=1)


# the kind name a detector card records -> the class that reads its arrays (and compiles those sklearn types)
KINDS: dict[str, type[CompiledClassifier]] = {
    cls.kind: cls for cls in (CompiledForest, CompiledGaussianNB, CompiledLogistic)}


def compile_classifier(estimator: Any) -> CompiledClassifier:
    """The compiled form of a fitted sklearn classifier (a compiled one is returned as it is); TypeError for
    estimators without one."""
    if isinstance(estimator, tuple(KINDS.values())):
        return estimator
    for compiled in KINDS.values():
        if isinstance(estimator, compiled.sklearn_types):
            return compiled.from_sklearn(estimator)
    raise TypeError(f"no compiled form for {type(estimator).__name__}: detectors support "
                    "RandomForestClassifier, GaussianNB, LogisticRegression and Pipeline(StandardScaler, "
                    "LogisticRegression)")
