"""The compiled forest gives exactly sklearn's answers."""

import numpy as np
import pytest
from sklearn.ensemble import RandomForestClassifier

from service.detect.compiled import CompiledForest


@pytest.mark.parametrize("depth", [1, 3, 5, None])
def test_compiled_forest_equals_sklearn(depth):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 12))
    y = (x[:, 0] + x[:, 1] ** 2 + 0.5 * rng.normal(size=600) > 1).astype(int)
    forest = RandomForestClassifier(n_estimators=25, max_depth=depth, random_state=0).fit(x, y)
    test = np.concatenate([rng.normal(size=(300, 12)), x[:50]])  # fresh points and points on the thresholds
    compiled = CompiledForest.from_sklearn(forest)
    np.testing.assert_array_equal(compiled.predict_proba(test), forest.predict_proba(test))
    again = CompiledForest.from_arrays(compiled.to_arrays())  # the detector file's arrays
    np.testing.assert_array_equal(again.predict_proba(test), forest.predict_proba(test))

