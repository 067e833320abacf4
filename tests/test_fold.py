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
    assert fold_batchnorm(model) == pairs
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5 * float(before.abs().max()))
    after = fisher_spectrum(model, x, k=9, method="exact").eigenvalues
    assert float((after - spectrum_before).abs().max() / spectrum_before.max()) < 1e-4


def test_fold_leaves_shared_or_untraceable_modules_alone():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)

        def forward(self, x):  # the conv's output also feeds a second branch: no fold
            y = self.conv(x)
            return self.norm(y) + y

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)

        def forward(self, x):
            return self.norm(self.conv(x)) if float(x.sum()) > 0 else x  # data-dependent control flow

    for cls in (Shared, Untraceable):
        model = cls().eval()
        assert fold_batchnorm(model) == 0
        assert isinstance(model.norm, nn.BatchNorm2d)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(Shared().train())


def test_registry_serves_vgg_without_batchnorm_and_with_its_methods():
    from service.zoo.registry import load_model

    loaded = load_model("vgg-shallow")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in loaded.module.modules())
    assert hasattr(loaded.module, "embed")  # the KD baseline's hook survives (same class, modules replaced)
