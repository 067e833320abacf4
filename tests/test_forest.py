"""The compiled forest gives exactly sklearn's answers."""

import numpy as np
import pytest
from sklearn.ensemble import RandomForestClassifier

from service.detect.forest import CompiledForest


@pytest.mark.parametrize("depth", [1, 3, 5, None])
def test_compiled_forest_equals_sklearn(depth):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 12))
    y = (x[:, 0] + x[:, 1] ** 2 + 0.5 * rng.normal(size=600) > 1).astype(int)
    forest = RandomForestClassifier(n_estimators=25, max_depth=depth, random_state=0).fit(x, y)
    test = np.concatenate([rng.normal(size=(300, 12)), x[:50]])  # fresh points and points on the thresholds
    np.testing.assert_array_equal(CompiledForest(forest).predict_proba(test), forest.predict_proba(test))


def test_shipped_detector_uses_the_compiled_forest_with_the_same_scores():
    from service.data.mnist import load_mnist
    from service.detect.detector import load_detector
    from service.detect.features import fisher_features
    from service.zoo.registry import load_model

    model = load_model("lenet5")
    detector = load_detector(model.card_path.parent / "lenet5.detector.joblib", model.sha256)
    images, _ = load_mnist("test")
    feats = fisher_features(model.module, images[:32], detector.feature_set, detector.k).matrix
    np.testing.assert_array_equal(detector.score_features(feats), detector.classifier.predict_proba(feats)[:, 1])
