"""The value every spectrum route returns."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class FisherSpectrum:
    """Top-k spectrum of the input-space Fisher information G_x for each image of a batch.

    eigenvalues:   (N, k) float64, descending. G_x has rank <= K-1, so entries K-1..k-1 are exact zeros.
    eigenvectors:  (N, r, *image_shape) unit L2 norm, r = min(k, K-1), or None when not asked for.
                   A vector whose eigenvalue is numerically zero is returned as all zeros.
    probabilities: (N, K) softmax of the model at the images.
    predictions:   (N,) argmax class.
    method:        the route that ran ("exact", "lanczos", "truncated", "power", "power-alias").
    error_bound:   (N,) absolute bound (or estimate, see `notes`) on the error of each returned eigenvalue.
    discarded_mass: (N,) probability mass left out by the truncated route, zeros otherwise.
    iterations:    (N,) iterations that ran (iterative routes), zeros otherwise.
    margin:        (N,) float64 gap z_(1) - z_(2) between the top two logits, when asked for (Gram routes).
    margin_gradient: (N, *image_shape) its gradient, from the same forward pass (one more backward product).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor | None
    probabilities: Tensor
    predictions: Tensor
    method: str
    error_bound: Tensor
    discarded_mass: Tensor
    iterations: Tensor
    notes: list[str] = field(default_factory=list)
    margin: Tensor | None = None
    margin_gradient: Tensor | None = None

    @property
    def num_classes(self) -> int:
        return int(self.probabilities.shape[1])

    @property
    def rank_bound(self) -> int:
        """G_x = J^T (diag(p) - p p^T) J has rank at most K - 1."""
        return self.num_classes - 1
