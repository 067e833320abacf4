"""Folding eval-mode BatchNorm into convolutions keeps the model's outputs and its Fisher spectrum."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from service.fisher import fisher_spectrum
from service.zoo.architectures import ShallowVGG
from service.zoo.fold import fold_batchnorm


def with_running_stats(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so that folding has something to do."""
    gen = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
            module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
    return model.eval().requires_grad_(False)


@pytest.mark.parametrize("name", ["resnet18", "vgg"])
def test_fold_keeps_outputs_and_spectrum(name):
    if name == "resnet18":
        model, x, pairs = torchvision.models.resnet18(num_classes=10), torch.rand(3, 3, 32, 32), 20
    else:
        model, x, pairs = ShallowVGG(width=8), torch.rand(3, 1, 28, 28), 7
    model = with_running_stats(model)
    before = model(x)
    spectrum_before = fisher_spectrum(model, x, k=9, method="exact").eigenvalues
    assert fold_batchnorm(model, torch.rand(2, *x.shape[1:])) == pairs
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5 * float(before.abs().max()))
    after = fisher_spectrum(model, x, k=9, method="exact").eigenvalues
    assert float((after - spectrum_before).abs().max() / spectrum_before.max()) < 1e-4


def test_fold_leaves_shared_or_rearranged_pairs_alone():
    """Only a plain conv -> BatchNorm is folded: not when the conv's output also feeds another branch, nor when an
    in-place op changes it before the BatchNorm (the same tensor object), nor when the conv runs twice; Python
    control flow is no obstacle (one real forward pass finds the pairs)."""

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)

    class Shared(Pair):
        def forward(self, x):  # the conv's output also feeds a second branch
            y = self.conv(x)
            return self.norm(y) + y

    class InPlace(Pair):
        def forward(self, x):  # ReLU in place: the BatchNorm gets the conv's tensor object, but changed
            return self.norm(torch.relu_(self.conv(x)))

    class Twice(Pair):
        def forward(self, x):
            return self.norm(self.conv(x)) + self.conv(x)

    class Branching(Pair):
        def forward(self, x):  # data-dependent control flow, which torch.fx could not trace
            return self.norm(self.conv(x)) if float(x.sum()) > 0 else x[..., 1:-1, 1:-1].repeat(1, 2, 1, 1)

    torch.manual_seed(0)  # the convs' weights and the example: unseeded, some draws make ReLU and BatchNorm commute
    example = torch.rand(2, 1, 6, 6)
    for cls in (Shared, InPlace, Twice):
        model = with_running_stats(cls())
        assert cls is not InPlace or bool((model.conv(example) < 0).any())  # the in-place ReLU changes something
        before = model(example)
        assert fold_batchnorm(model, example) == 0, cls.__name__
        assert isinstance(model.norm, nn.BatchNorm2d) and isinstance(model.conv, nn.Conv2d)
        torch.testing.assert_close(model(example), before)
    model = with_running_stats(Branching())
    before = model(example)
    assert fold_batchnorm(model, example) == 1 and isinstance(model.norm, nn.Identity)
    torch.testing.assert_close(model(example), before, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(Shared().train(), example)


def test_fold_does_not_disturb_other_threads():
    """Folding a model while another thread runs a model: the other thread's forward passes are untouched (torch.fx
    tracing, used before, patched nn.Module.__call__ for the whole process and broke them)."""
    import threading

    runner = ShallowVGG(width=8).eval()
    x = torch.rand(2, 1, 28, 28)
    expected = runner(x)
    errors: list[BaseException] = []
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                torch.testing.assert_close(runner(x), expected)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return

    thread = threading.Thread(target=run)
    thread.start()
    try:
        for _ in range(5):
            assert fold_batchnorm(with_running_stats(ShallowVGG(width=8)), x) == 7
    finally:
        stop.set()
        thread.join()
    assert not errors, errors[0]


def test_registry_serves_vgg_without_batchnorm_and_with_its_methods():
    from service.zoo.registry import load_model

    loaded = load_model("vgg-shallow")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in loaded.module.modules())
    assert hasattr(loaded.module, "embed")  # the KD baseline's hook survives (same class, modules replaced)
