"""Model cards: one JSON file `models/<name>.json` next to its weights, describing how to build and feed the model."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Framework = Literal["builtin", "torchvision", "torchscript"]


class ModelCard(BaseModel):
    """What the registry needs to load a model and what a user needs to trust it."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str = Field(description="Registry name, e.g. 'lenet5'.")
    framework: Framework = Field("builtin",
                                 description="builtin (service.zoo.architectures), torchvision or torchscript.")
    architecture: str = Field(description="Builtin name ('lenet5', 'vgg-shallow'), torchvision name ('resnet18') "
                              "or 'torchscript'.")
    activation: str | None = Field(None, description="'relu' or 'elu' for builtin architectures.")
    architecture_kwargs: dict[str, int | float | str] = Field(default_factory=dict,
                                                             description="Extra constructor arguments, e.g. width.")
    weights: str = Field(description="Weights file, relative to the card's folder (or absolute).")
    sha256: str | None = Field(None, description="sha256 of the weights file; checked at load when given.")
    input_shape: list[int] = Field(description="[C, H, W] of one input image in [0, 1] pixel space.")
    mean: list[float] = Field(description="Per-channel mean of the normalisation inside the model.")
    std: list[float] = Field(description="Per-channel std of the normalisation inside the model.")
    class_names: list[str] = Field(description="Name of each output class, in logit order.")
    num_classes: int = Field(gt=1, description="Number of output logits.")
    training_command: str | None = Field(None, description="The exact command that produced the weights.")
    seed: int | None = None
    test_accuracy: float | None = Field(None, description="Accuracy on the test split it was measured on.")
    test_split: str | None = Field(None, description="Which data the accuracy was measured on.")
    notes: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        if len(self.input_shape) != 3 or min(self.input_shape) < 1:
            raise ValueError(f"input_shape must be [C, H, W] of positive sizes, got {self.input_shape}")
        channels = self.input_shape[0]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean and std need {channels} values each (one per channel)")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names has {len(self.class_names)} names but num_classes is {self.num_classes}")
        return self

    @classmethod
    def read(cls, path: str | Path) -> ModelCard:
        """Parse a card file."""
        return cls.model_validate_json(Path(path).read_text())

    def write(self, path: str | Path) -> None:
        """Save as indented JSON."""
        Path(path).write_text(self.model_dump_json(indent=2) + "\n")
