"""The frozen TorchScript twin used for the detector's forward-only probes (service/zoo/frozen.py)."""

from __future__ import annotations

import torch
from torch import nn

from service.zoo.frozen import frozen_twin


def test_twin_matches_the_model_at_any_batch_size(case):
    model, x = case.model, case.images
    with torch.no_grad():
        twin = frozen_twin(model, x)
        assert isinstance(twin, torch.jit.ScriptModule)
        assert frozen_twin(model, x[:1]) is twin  # cached per model and image shape
        for batch in (x[:1], x, torch.cat([x] * 9)):
            torch.testing.assert_close(twin(batch), model(batch), rtol=1e-4, atol=1e-4)


class Branchy(nn.Module):
    """Python control flow on a tensor value: a trace would keep one branch only."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        return self.linear(x) if float(x.sum()) > 0 else -self.linear(x)


def test_untraceable_models_run_as_they_are():
    model = Branchy().eval().requires_grad_(False)
    with torch.no_grad():
        assert frozen_twin(model, torch.ones(2, 4)) is model


def test_no_twin_in_training_mode_or_with_gradients(lenet_case):
    model, x = lenet_case.model, lenet_case.images
    assert frozen_twin(model, x) is model  # gradients enabled: the twin cannot give them
    with torch.no_grad():
        model.train()
        try:
            assert frozen_twin(model, x) is model
        finally:
            model.eval()


def test_an_in_place_weight_update_makes_a_new_twin(cnn_case):
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).eval().requires_grad_(False)
    x = cnn_case.images
    with torch.no_grad():
        before = frozen_twin(model, x)
        model[1].weight.mul_(2.0)
        after = frozen_twin(model, x)
        assert after is not before
        torch.testing.assert_close(after(x), model(x), rtol=1e-4, atol=1e-4)


def test_a_twin_that_disagrees_is_not_used(monkeypatch, lenet_case):
    from service.zoo import frozen

    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)).eval().requires_grad_(False)
    monkeypatch.setattr(frozen, "AGREEMENT_TOLERANCE", -1.0)  # no gap is small enough
    with torch.no_grad():
        assert frozen_twin(model, lenet_case.images) is model
