"""The exact route: G_x's spectrum from the small Gram matrix of the Jacobian, batched with torch.func.

With A = diag(p) - p p^T = S S^T, G_x = J^T A J = (S^T J)^T (S^T J). The non-zero eigenvalues of G_x are
those of the K x K matrix M = (S^T J)(S^T J)^T, and G_x's eigenvectors are (S^T J)^T u / sqrt(lambda).
The rows of S^T J are vector-Jacobian products with the columns of S as cotangents, so K backward passes
give them for a whole batch at once: in eval mode images do not interact. S has the null vector sqrt(p),
so a K x (K-1) factor L with L L^T = A serves as well: K-1 backward passes.

The same code serves the truncated route: the paper's equation (4), G_x = sum_i p_i g_i g_i^T with
g_i = J^T (e_i - p), summed over the most probable classes only. Each kept class costs one backward pass
(cotangent sqrt(p_i) (e_i - p)); the dropped terms are PSD, so the kept sum's eigenvalues are lower bounds,
off by at most delta * max_i ||g_i||^2 for a discarded mass delta. (Truncating A to the kept block instead
would leak the softmax-invariant direction J^T 1, which is large in deep nets.)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap

DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes for the Jacobian block of one chunk of images


def sqrt_fisher_factor(q: Tensor, rest: Tensor | None = None) -> Tensor:
    """S with S S^T = diag(q) - q q^T for probabilities q (B, m) of total mass 1 - rest <= 1; returns (B, m, m).

    S = diag(sqrt q) - alpha q sqrt(q)^T with alpha = 1 / (1 + sqrt(rest)). `rest` (B,) is the probability
    left out (0 for all K classes); pass it when known: 1 - sum(q) loses digits to cancellation, which
    sqrt(rest) would magnify (1e-16 -> 1e-8).
    """
    if rest is None:
        rest = (1 - q.sum(-1)).clamp(min=0)
    alpha = 1 / (1 + rest.clamp(min=0).sqrt())
    sq = q.sqrt()
    return torch.diag_embed(sq) - alpha[:, None, None] * q.unsqueeze(-1) * sq.unsqueeze(-2)


def images_per_chunk(rows: int, dim: int, itemsize: int, memory_budget: int) -> int:
    """How many images fit in `memory_budget` bytes when each needs a (rows x dim) Jacobian block (x3 slack)."""
    return max(1, memory_budget // max(1, 3 * rows * dim * itemsize))


def reduced_fisher_factor(p: Tensor) -> Tensor:
    """L (B, K, K-1) with L L^T = diag(p) - p p^T for full probability vectors p (B, K): one backward pass fewer.

    S = sqrt_fisher_factor(p) has S u = 0 for the unit vector u = sqrt(p). The Householder reflector H with
    H u = -e_K (w = u + e_K) has its first K-1 columns orthonormal and orthogonal to u, so L = (S H)[:, :K-1]
    keeps S S^T; as S w = S e_K, S H = S - S e_K w^T / (1 + u_K).
    """
    s = sqrt_fisher_factor(p, torch.zeros_like(p[:, 0]))
    root = p.sqrt()
    w = torch.cat([root[..., :-1], root[..., -1:] + 1], -1)  # not in place: the differentiable route backprops here
    sh = s - s[..., -1:] * (w / w[..., -1:]).unsqueeze(-2)
    return sh[..., :-1]


def select_classes(probs: Tensor, mass: float, max_classes: int | None) -> tuple[Tensor, Tensor, Tensor] | None:
    """The truncated route's classes: per image the fewest most probable classes covering `mass`, at most
    `max_classes`; each image's choice does not depend on the rest of the batch.

    Returns (classes (B, m), their probabilities q (B, m) with zeros past each image's own count, discarded
    mass (B,)), m the largest count in the batch; None when every image keeps all K classes.
    """
    num_classes = probs.shape[1]
    ordered, order = probs.sort(dim=-1, descending=True)
    counts = ((ordered.cumsum(-1) < mass).sum(-1) + 1).clamp(max=min(max_classes or num_classes, num_classes))
    m = int(counts.max())
    if m == num_classes and bool((counts == num_classes).all()):
        return None
    keep = torch.arange(num_classes, device=probs.device) < counts.unsqueeze(-1)
    discarded = torch.where(keep, 0, ordered).sum(-1)
    return order[:, :m], torch.where(keep, ordered, 0)[:, :m], discarded


# Up to this many rows (images x cotangents), one forward + backward pass over copies of the batch beats
# separate backward passes: at batch 1 the per-call overhead dominates (LeNet-5, 1 image: ~5 ms vs ~10 ms).
REPLICATE_MAX_ROWS = 32


def margin_cotangents(logits: Tensor) -> tuple[Tensor, Tensor]:
    """e_(1) - e_(2) per image, for the top two classes of `logits` (B, K), and the logit gap z_(1) - z_(2) (B,)
    float64: the cotangent whose vector-Jacobian product is the gap's gradient (DeepFool's step to the nearest
    class under the linearisation)."""
    top = logits.detach().topk(2, dim=-1)
    images = torch.arange(logits.shape[0], device=logits.device)
    cot = torch.zeros_like(logits)
    cot[images, top.indices[:, 0]] = 1.0
    cot[images, top.indices[:, 1]] = -1.0
    return cot, (top.values[:, 0] - top.values[:, 1]).double()


def replicated_rows(model: nn.Module, x: Tensor, num_classes: int, margin: bool = False
                    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
    """The exact route's K-1 rows for a small batch from ONE forward and ONE backward pass over K-1 copies of
    the batch (eval mode: copies do not interact); the first copy's logits give p and the cotangents. With
    `margin`, one more copy gives the gradient of the top-two logit gap.
    Returns (rows (K-1, B, *S), probabilities (B, K) float64, (gap (B,), gap gradient (B, *S)) or None)."""
    r, b = num_classes - 1, x.shape[0]
    n = r + int(margin)
    copies = x.detach().unsqueeze(0).expand(n, *x.shape).reshape(n * b, *x.shape[1:]).requires_grad_(True)
    with torch.enable_grad():
        out = model(copies)
        probs = torch.softmax(out[:b].detach().double(), dim=-1)
        cot = reduced_fisher_factor(probs).permute(2, 0, 1).to(out.dtype)  # (r, B, K)
        gap = None
        if margin:
            margin_cot, gap = margin_cotangents(out[:b])
            cot = torch.cat([cot, margin_cot.unsqueeze(0)])
        (grads,) = torch.autograd.grad(out, copies, cot.reshape(n * b, -1))
    grads = grads.reshape(n, b, *x.shape[1:])
    return grads[:r], probs, None if gap is None else (gap, grads[r])


@contextlib.contextmanager
def onednn_on_cpu(x: Tensor) -> Iterator[None]:
    """oneDNN convolutions on the CPU for the rows' forward and backward passes, whatever the caller chose (the API
    turns them off for small batches: faster forward passes). The native kernels round a convolution differently
    from 16 images (or copies) on, and on digits' flat backgrounds that rounding is what breaks the ties of
    max-pooling, i.e. which pixel a window's gradient goes to: an image's spectrum then depended on its batch (up
    to 3% on LeNet-5's top eigenvalues). oneDNN's agree at every batch size (to 1e-8), and with the float64 dense
    reference (tests/test_fisher.py)."""
    if x.device.type != "cpu" or torch.backends.mkldnn.enabled:
        yield
        return
    torch.backends.mkldnn.enabled = True
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = False


def factor_rows(model: nn.Module, x: Tensor, *, mass: float = 1.0, max_classes: int | None = None,
                class_chunk: int | None = None, num_classes: int | None = None, margin: bool = False,
                ) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor] | None]:
    """Rows of F^T J, F F^T = A (or A restricted to the kept classes), for a chunk of images (oneDNN on, on the
    CPU: `onednn_on_cpu`)."""
    with onednn_on_cpu(x):
        return _factor_rows(model, x, mass=mass, max_classes=max_classes, class_chunk=class_chunk,
                            num_classes=num_classes, margin=margin)


def _factor_rows(model: nn.Module, x: Tensor, *, mass: float = 1.0, max_classes: int | None = None,
                 class_chunk: int | None = None, num_classes: int | None = None, margin: bool = False,
                 ) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor] | None]:
    """Rows of F^T J, F F^T = A (or A restricted to the kept classes), for a chunk of images.

    x: (B, *S). All K classes (mass=1, no max_classes): F = reduced_fisher_factor, K-1 rows. Otherwise the
    truncated route's classes (`select_classes`) i, with columns sqrt(p_i) (e_i - p) (equation (4)).
    class_chunk: None runs the backward passes one after another (fastest on CPU), or, for the exact route on a
    small batch (num_classes given), one pass over copies of the batch (`replicated_rows`); 1 always one after
    another; n > 1 vmaps n at once. margin: also the gradient of the top-two logit gap, from the same forward pass.
    Returns (rows (B, r, D), probabilities (B, K) float64, discarded probability mass (B,), (gap (B,) float64,
    its gradient (B, *S)) or None).
    """
    b = x.shape[0]
    exact = mass >= 1.0 and max_classes is None
    if exact and class_chunk is None and num_classes is not None and b * (num_classes - 1) <= REPLICATE_MAX_ROWS:
        rows, probs, gap = replicated_rows(model, x, num_classes, margin)
        return rows.reshape(rows.shape[0], b, -1).transpose(0, 1), probs, torch.zeros_like(probs[:, 0]), gap
    logits, vjp_fn = vjp(model, x)
    probs = torch.softmax(logits.detach().double(), dim=-1)
    kept = None if exact else select_classes(probs, mass, max_classes)
    if kept is None:
        factor = reduced_fisher_factor(probs)  # (B, K, K-1)
        discarded = torch.zeros(b, dtype=probs.dtype, device=probs.device)
    else:
        # equation (4) over the kept classes: column j is sqrt(p_i) (e_i - p), i the j-th kept class, so the
        # rows are sqrt(p_i) g_i and G_M = sum_{i kept} p_i g_i g_i^T <= G_x (zero columns past an image's count)
        classes, q, discarded = kept
        root = q.sqrt()
        factor = -probs.unsqueeze(-1) * root.unsqueeze(1)  # (B, K, m)
        factor.scatter_add_(1, classes.unsqueeze(1), root.unsqueeze(1))
    cot = factor.permute(2, 0, 1).to(logits.dtype)  # (r, B, K): cotangent j gives row j of every image
    if class_chunk is None or class_chunk <= 1:
        rows = torch.stack([vjp_fn(c)[0] for c in cot])
    else:
        (rows,) = vmap(vjp_fn, chunk_size=class_chunk)(cot)
    rows = rows.reshape(rows.shape[0], b, -1).transpose(0, 1)
    gap = None
    if margin:
        margin_cot, values = margin_cotangents(logits)
        gap = (values, vjp_fn(margin_cot)[0])
    return rows, probs, discarded, gap


def gram_eigenpairs(rows: Tensor, k: int, return_vectors: bool) -> tuple[Tensor, Tensor | None, Tensor]:
    """Top-k eigenpairs of G = rows^T rows from the m x m Gram matrix.

    Returns eigenvalues (B, min(k, m)) float64 descending, eigenvectors (B, min(k, m), D) or None, and the
    absolute rounding bound per image. Eigenvalues are clamped at zero; the vectors of eigenvalues under the
    rounding bound are returned as zeros: they carry no direction.
    """
    gram = torch.bmm(rows, rows.transpose(1, 2)).double()
    evals, evecs = torch.linalg.eigh(gram)
    evals, evecs = evals.flip(-1), evecs.flip(-1)
    m = gram.shape[-1]
    eps = torch.finfo(rows.dtype).eps
    bound = evals[:, :1].clamp(min=0) * eps * (4 * m + math.sqrt(rows.shape[-1]))
    r = min(k, m)
    evals = evals[:, :r].clamp(min=0)
    zero = evals <= bound
    vectors = None
    if return_vectors:
        u = evecs[:, :, :r].to(rows.dtype)
        vectors = torch.bmm(u.transpose(1, 2), rows)  # (B, r, D)
        norms = vectors.norm(dim=-1, keepdim=True)
        unit = vectors / norms.clamp(min=torch.finfo(rows.dtype).tiny)
        vectors = torch.where(zero.unsqueeze(-1), torch.zeros_like(vectors), unit)
    return evals, vectors, bound.squeeze(-1)
