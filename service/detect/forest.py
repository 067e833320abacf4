"""A fitted sklearn random forest evaluated level by level with numpy, for the screening hot path.

sklearn's `predict_proba` walks each tree in Python-level loops (~0.1 ms per tree and call, whatever the batch);
our trees are shallow (depth <= 5), so evaluating every tree at once, one level per step, costs a few array
operations. The answer is the same as sklearn's: features compared in float32 against the float64 thresholds,
per-tree leaf class fractions averaged over the trees.
"""

from __future__ import annotations

import numpy as np
from sklearn.ensemble import RandomForestClassifier


class CompiledForest:
    """The trees of a fitted RandomForestClassifier packed into (n_trees, n_nodes) arrays."""

    def __init__(self, forest: RandomForestClassifier) -> None:
        trees = [estimator.tree_ for estimator in forest.estimators_]
        width = max(tree.node_count for tree in trees)
        n = len(trees)
        self.feature = np.zeros((n, width), dtype=np.int64)
        self.threshold = np.zeros((n, width), dtype=np.float64)
        self.left = np.zeros((n, width), dtype=np.int64)
        self.right = np.zeros((n, width), dtype=np.int64)
        self.value = np.zeros((n, width, forest.n_classes_), dtype=np.float64)
        for i, tree in enumerate(trees):
            count = tree.node_count
            leaf = tree.children_left[:count] == -1
            self.feature[i, :count] = np.where(leaf, 0, tree.feature[:count])
            self.threshold[i, :count] = tree.threshold[:count]
            # a leaf points at itself, so that every tree can take the same number of steps
            self.left[i, :count] = np.where(leaf, np.arange(count), tree.children_left[:count])
            self.right[i, :count] = np.where(leaf, np.arange(count), tree.children_right[:count])
            values = tree.value[:count, 0, :]
            self.value[i, :count] = values / values.sum(axis=1, keepdims=True)
        self.depth = max(estimator.get_depth() for estimator in forest.estimators_)
        self.classes_ = forest.classes_

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """(N, n_classes) class probabilities, equal to the forest's own `predict_proba`."""
        x = np.asarray(features, dtype=np.float32)
        n_trees = self.feature.shape[0]
        rows = np.arange(n_trees)[:, None]
        node = np.zeros((n_trees, x.shape[0]), dtype=np.int64)
        samples = np.arange(x.shape[0])[None, :]
        for _ in range(self.depth):
            goes_left = x[samples, self.feature[rows, node]] <= self.threshold[rows, node]
            node = np.where(goes_left, self.left[rows, node], self.right[rows, node])
        return self.value[rows, node].mean(axis=0)
