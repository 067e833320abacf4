"""Request and response bodies of the API (pydantic): what the OpenAPI schema shows is what the server does."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.attacks.specs import ATTACK_NAMES, ATTACK_SPECS

SpectrumMethod = Literal["auto", "exact", "lanczos", "truncated", "power", "power-alias"]
VectorFormat = Literal["none", "png", "tensor", "both"]
ImageFormat = Literal["png", "tensor", "both"]
AttackName = Literal[ATTACK_NAMES]  # type: ignore[valid-type]  # the attack table's names
# an MNIST test digit (a 6) as base64 PNG: the examples of the OpenAPI schema
EXAMPLE_PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAABwAAAAcCAAAAABXZoBIAAAA8klEQVR4nM3PP0uCURQG8Af/I4gOmoODuYiDuPUBIhp7P0CO4eIo"
    "+AGswTGchHeJQNEtnJpCIRIaA0HQcEkTMXEWn5MtItq9dww60znnxznnXuDvI9WS7wsT2qTkDZb7Ih+P9xquvTwSwpO11g+Gu2TC"
    "dPGB7HhN2OU0fdhx7DK/H7OeCTNpjABEmqWYurVKXgHWhCwrFujLGLA2IiLF3xglb4B3IcmachMATmN4vQbqWgy48RLHx9u2dB3g"
    "cuXL+nD3qZlM4nmKaBAD5bWOBte3OBNykVH/eTTk3LaFPFENuOyRFFacOsT5PdkueLT2P+IHPZtYSObfLhkAAAAASUVORK5CYII="
)
ATTACK_DESCRIPTION = "; ".join(f"`{s.name}`: {s.description}" for s in ATTACK_SPECS.values())


MAX_CLASS = 2**31 - 1  # a class index; the model's own count is checked by the engine


class ImagesInput(BaseModel):
    """Images as base64 files or as a tensor (exactly one of the two)."""

    model_config = ConfigDict(extra="forbid")

    images: list[str] | None = Field(
        None, description="base64-encoded PNG or JPEG files (a data: URL prefix is allowed), one image each; "
        "a base64 .npy file may hold one image or a batch.", examples=[["iVBORw0KGgo..."]])
    tensor: list[Any] | None = Field(
        None, description="Nested lists of pixel values: one image [C, H, W] ([H, W] for 1-channel models) or a "
        "batch [N, C, H, W]. Values in [0, 1]; 0-255 values are divided by 255 (the response says so).")
    resize: bool = Field(False, description="Resize images of another size to the model's input (bilinear); "
                         "otherwise a size mismatch is an error.")

    @model_validator(mode="after")
    def _one_input(self) -> ImagesInput:
        if (self.images is None) == (self.tensor is None):
            raise ValueError("give exactly one of 'images' (base64 files) and 'tensor' (nested lists)")
        return self


class ScreenRequest(ImagesInput):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"images": [EXAMPLE_PNG]}]})

    threshold: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False,
                                    description="Verdict threshold on the score; default: the detector's own "
                                    "(chosen at its target false-positive rate).")


class SpectrumRequest(ImagesInput):
    model_config = ConfigDict(extra="forbid",
                              json_schema_extra={"examples": [{"images": [EXAMPLE_PNG], "k": 3, "vectors": "png"}]})

    k: int = Field(10, ge=1, description="Number of eigenpairs (at most the setting max_k).")
    method: SpectrumMethod = Field("auto", description="Route to the spectrum: auto, exact (Gram), lanczos, "
                                   "truncated, power / power-alias (the paper's Algorithm 1, k = 1 only).")
    vectors: VectorFormat = Field("none", description="Return the eigenvectors: none, png (each scaled so that "
                                  "mid-grey is 0), tensor (nested lists, unit L2 norm) or both.")


class AttackRequest(ImagesInput):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"images": [EXAMPLE_PNG], "attack": "ossa", "epsilon": 2.0}]})

    attack: AttackName = Field("ossa", description=ATTACK_DESCRIPTION)
    epsilon: float = Field(1.0, ge=0.0, allow_inf_nan=False,
                           description="L2 budget in [0, 1] pixel space (at most the setting max_epsilon); for "
                           "least-norm the upper end of the search.")
    labels: list[Annotated[int, Field(ge=0, le=MAX_CLASS)]] | None = Field(
        None, description="True class per image; default: the model's prediction.")
    options: dict[str, int | float | str | bool] = Field(
        default_factory=dict, description="The attack's own options by name (e.g. {\"steps\": 20}); an option the "
        "attack does not take is a 422 that lists the ones it takes.")
    steps: int | None = Field(None, ge=1, description="Shorthand for options.steps (iterative-ossa, bim, opt; at most "
                              "the setting max_attack_steps).")
    step_size: float | None = Field(None, gt=0.0, allow_inf_nan=False,
                                    description="Shorthand for options.step_size (iterative-ossa, bim).")
    c: float | None = Field(None, ge=0.0, allow_inf_nan=False, description="Shorthand for options.c (opt).")
    base_attack: Literal["ossa", "fgm"] | None = Field(None, description="Shorthand for options.base_attack "
                                                       "(least-norm: the direction searched, default ossa).")
    output: ImageFormat = Field("png", description="Adversarial images as base64 PNG, tensor, or both.")


class Traced(BaseModel):
    """What every answer names so that it can be traced: model, weights and method."""

    model: str = Field(description="Model name.")
    sha256: str = Field(description="sha256 of the model's weights file.")
    method: str = Field(description="How the answer was computed.")
    notes: list[str] = Field(default_factory=list, description="What was done to the inputs (scaling, resizing) "
                             "and remarks of the engine.")


class DetectorInfo(BaseModel):
    id: str | None = Field(None, description="The detector's id: the first 16 hex digits of its file's sha256 "
                           "(what screening answers name as detector_id).")
    threshold: float = Field(description="Default verdict threshold on the score.")
    auc: float | None = Field(description="ROC AUC measured when the detector was trained.")
    auc_split: str | None = Field(description="Where the AUC, TPR and FPR were measured: 'test' or 'validation'.")
    tpr: float | None = Field(None, description="True-positive rate at the threshold, measured with the AUC.")
    fpr: float | None = Field(None, description="False-positive rate at the threshold (all negatives: clean and "
                              "noisy images), measured with the AUC.")
    clean_fpr: float | None = Field(None, description="False-positive rate on the clean images alone (what a "
                                    "production input sees), when the card records it.")
    target_fpr: float | None = Field(None, description="The false-positive rate the threshold was chosen at.")
    feature_set: str
    k: int = Field(description="Eigenvalues the detector uses.")
    file: str | None = Field(description="The detector file's name.")
    activated_at: str | None = Field(None, description="When it was activated (ISO 8601, UTC); null for a detector "
                                     "that was never activated (the shipped ones).")
    rollback_available: bool = Field(False, description="Whether the detector it replaced is kept: "
                                     "POST /v1/models/{model}/detector/rollback restores it.")
    previous_id: str | None = Field(None, description="The id of the detector a rollback would restore.")


class ModelInfo(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    sha256: str = Field(description="sha256 of the weights file.")
    device: str
    input_shape: list[int] = Field(description="[C, H, W] of one image in [0, 1].")
    mean: list[float] = Field(description="Per-channel normalisation mean (applied inside the model).")
    std: list[float] = Field(description="Per-channel normalisation std (applied inside the model).")
    class_names: list[str]
    num_classes: int
    test_accuracy: float | None
    test_split: str | None
    detector: DetectorInfo | None = Field(description="The attached detector, or null: /screen is then refused.")
    detector_error: str | None = Field(None, description="Why a detector file next to the model was not loaded.")


class ModelList(BaseModel):
    models: list[ModelInfo]


class ScreenItem(BaseModel):
    score: float = Field(description="Adversarial score in [0, 1].")
    adversarial: bool = Field(description="score >= threshold.")
    prediction: int
    class_name: str
    probability: float = Field(description="The model's probability of its prediction.")
    eigenvalues: list[float] = Field(description="The top eigenvalues of G_x the detector used.")


class ScreenResponse(Traced):
    threshold: float
    threshold_source: Literal["detector", "request"]
    detector_auc: float | None
    detector_id: str | None = Field(description="The detector that scored every image of this answer (the first 16 "
                                    "hex digits of its file's sha256; GET /v1/models shows the active one). A "
                                    "request is scored in one batch, by one detector, even while another is "
                                    "being activated.")
    results: list[ScreenItem]


class ActivateDetectorRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"candidate": "lenet5.detector.20250101T120000Z.npz"}]})

    candidate: str = Field(min_length=1, max_length=255, description="The file name of a candidate detector (.npz) "
                           "in <models_dir>/candidates/ (where train-detector writes them): a name only, no path.")


class PreviousDetector(BaseModel):
    id: str = Field(description="The id of the detector kept for rollback.")
    file: str = Field(description="Its file's name.")


class DetectorActivation(BaseModel):
    model: str
    detector: DetectorInfo | None = Field(description="The detector this process screens with now (the one just "
                                          "activated; other processes follow within detector_poll_s).")
    detector_error: str | None = Field(None, description="Why this process did not swap it in, if it did not.")
    source: str = Field(description="What was activated: the candidate's file name, or 'rollback'.")
    previous: PreviousDetector | None = Field(description="What a rollback would restore; null: nothing.")
    removed: list[str] = Field(default_factory=list, description="Detector files no card names any more, deleted.")


class SpectrumItem(BaseModel):
    eigenvalues: list[float] = Field(description="Top-k eigenvalues of G_x, descending (zeros past rank K-1).")
    error_bound: float
    discarded_mass: float
    iterations: int
    prediction: int
    class_name: str
    probabilities: list[float]
    eigenvectors_png: list[str] | None = Field(None, description="base64 PNG per eigenvector (mid-grey = 0).")
    eigenvectors: list[Any] | None = Field(None, description="Eigenvectors [r, C, H, W], unit L2 norm.")


class SpectrumResponse(Traced):
    k: int
    results: list[SpectrumItem]


class AttackItem(BaseModel):
    label: int = Field(description="The class the attack moved away from.")
    original_prediction: int
    adversarial_prediction: int
    fooled: bool
    perturbation_norm: float = Field(description="L2 norm of adversarial - original, pixel space.")
    top_eigenvalue: float = Field(description="Top eigenvalue of G_x at the original image.")
    least_norm: float | None = Field(None, description="least-norm: smallest fooling epsilon (null: not found).")
    found: bool | None = None
    adversarial_png: str | None = Field(None, description="The adversarial image as base64 PNG (8-bit).")
    perturbation_png: str | None = Field(None, description="The perturbation (adversarial - original) as base64 PNG: "
                                         "mid-grey is 0, white and black +/- its largest pixel change.")
    adversarial: list[Any] | None = Field(None, description="The adversarial image [C, H, W] in [0, 1].")


class AttackResponse(Traced):
    attack: str
    epsilon: float
    results: list[AttackItem]


class Liveness(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready"] = "ready"
    models: list[str]


# ---- Open Inference Protocol v2 (KServe / Triton) ----

class InferTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str = Field(description="FP32, FP64, FP16, UINT8 (0-255), UINT16..UINT64, INT8..INT64, BOOL (BYTES: "
                          "encoded images, as binary data only).")
    data: list[Any] | None = Field(None, description="Values in row-major order (flat or nested); absent when the "
                                   "tensor is binary data (`parameters.binary_data_size`).")
    parameters: dict[str, Any] | None = Field(None, description="`binary_data_size`: bytes of this tensor after the "
                                              "JSON header (binary tensor data extension).")


class InferRequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = Field(None, description="`binary_data`: true to get this output as binary "
                                              "data after the JSON header.")


class InferRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}]}]})

    id: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="`binary_data_output`: true to get every output "
                                              "(unless it says otherwise) as binary data.")
    inputs: list[InferTensor] = Field(min_length=1, max_length=1, description="One tensor [N, C, H, W] of images, "
                                      "or BYTES [N]: N encoded images (PNG, JPEG, .npy).")
    outputs: list[InferRequestedOutput] | None = None


class InferResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[InferTensor]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2Health(BaseModel):
    live: bool | None = None
    ready: bool | None = None


class ConfigReshape(BaseModel):
    shape: list[int]


class ConfigTensor(BaseModel):
    """A tensor of a Triton model configuration (dims without the batch dimension)."""

    name: str
    data_type: str = Field(description="Triton's type name, e.g. TYPE_FP32.")
    format: str | None = Field(None, description="FORMAT_NCHW for image inputs.")
    dims: list[int]
    reshape: ConfigReshape | None = Field(None, description="Shape per batch item when it is a scalar ([]).")


class ModelConfig(BaseModel):
    """The model configuration extension: Triton's field names, for what this service really does."""

    name: str
    platform: str
    backend: str
    version_policy: dict[str, Any]
    max_batch_size: int = Field(description="Most images in one request.")
    input: list[ConfigTensor]
    output: list[ConfigTensor]
    dynamic_batching: dict[str, Any] = Field(description="Micro-batching: the longest wait for more requests.")
    instance_group: list[dict[str, Any]]
    parameters: dict[str, dict[str, str]] = Field(description="What else describes the model (Triton's "
                                                  "`{key: {string_value}}` form).")


class StatisticDuration(BaseModel):
    count: int
    ns: int = Field(description="Cumulative nanoseconds.")


class InferStatistics(BaseModel):
    success: StatisticDuration = Field(description="Answered requests, from their routing to their answer.")
    fail: StatisticDuration = Field(description="Refused or failed requests, from their routing to their answer.")
    queue: StatisticDuration = Field(description="Per request: its wait for the model.")
    compute_infer: StatisticDuration = Field(description="Per request: the model's time on the batch that held it.")


class BatchStatistics(BaseModel):
    batch_size: int
    compute_infer: StatisticDuration


class ModelStatistics(BaseModel):
    name: str
    version: str
    last_inference: int = Field(description="When the model last ran, ms since the epoch (0: never).")
    inference_count: int = Field(description="Images inferred.")
    execution_count: int = Field(description="Model runs (micro-batches).")
    inference_stats: InferStatistics
    batch_stats: list[BatchStatistics]


class InferenceStatisticsResponse(BaseModel):
    """The statistics extension: per model, its v2 inference requests in the process that answers."""

    model_config = ConfigDict(protected_namespaces=())

    model_stats: list[ModelStatistics]
