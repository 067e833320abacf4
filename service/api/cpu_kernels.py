"""The CPU-kernel policy of a model's worker thread: torch threads and oneDNN chosen by batch size.

A single image gains nothing from a second thread on a busy machine and runs small convolutions faster without
oneDNN; a large batch gains from both (measurements: docs/decisions/, bench/bench_api.py). The settings
api_torch_threads, api_torch_threads_large_batch, api_large_batch and api_small_batch_onednn fill it in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class KernelPolicy:
    threads: int = 1  # torch threads below `large_batch` images
    large_batch_threads: int = 1  # torch threads from `large_batch` images on
    large_batch: int = 48
    small_batch_onednn: bool = True  # oneDNN (mkldnn) convolutions below `large_batch` images

    def for_batch(self, size: int) -> tuple[int, bool]:
        """(torch threads, oneDNN on) for a batch of `size` images."""
        large = size >= self.large_batch
        return (self.large_batch_threads if large else self.threads), (large or self.small_batch_onednn)


def with_kernels(fn: Callable[[torch.Tensor], T], batch: torch.Tensor, policy: KernelPolicy) -> T:
    """fn(batch) with the policy's threads and oneDNN setting for its size (oneDNN restored afterwards)."""
    threads, onednn = policy.for_batch(int(batch.shape[0]))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = onednn
    try:
        return fn(batch)
    finally:
        torch.backends.mkldnn.enabled = previous
