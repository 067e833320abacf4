"""The HTTP API through httpx (Starlette's TestClient) against the real app with real models: every endpoint and
input form, answers equal to the engine's for the same input, metrics, the OpenAPI schema, OIP v2 and batching."""

from __future__ import annotations

import base64
import io
import threading

import numpy as np
import pytest
import torch
from api_support import (
    BARE,
    MODEL,
    PYTESTMARK,
    assert_problem,
    assert_v2_error,
    b64,
    npy_bytes,
    png_bytes,
)
from PIL import Image

from service.attacks import ossa
from service.data.mnist import load_mnist
from service.fisher import fisher_spectrum

pytestmark = PYTESTMARK


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_mnist("test")
    return images[:8], labels[:8]


# ---- health, models, metadata ----

def test_health_and_readiness(client):
    assert client.get("/health/live").json() == {"status": "ok"}
    assert client.get("/health/ready").json() == {"status": "ready", "models": sorted([MODEL, BARE])}
    assert client.get("/v2/health/live").json()["live"] is True
    assert client.get("/v2/health/ready").json()["ready"] is True
    assert client.get("/v2").json()["name"] == "fisher-guard"


def test_models_list_and_show(client, engine):
    _, detector, sha = engine
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert set(models) == {MODEL, BARE}
    info = client.get(f"/v1/models/{MODEL}").json()
    assert info == models[MODEL]
    assert info["sha256"] == sha and info["input_shape"] == [1, 28, 28] and info["num_classes"] == 10
    assert info["class_names"] == [str(d) for d in range(10)] and info["device"] == "cpu"
    assert info["mean"] == [0.1307] and info["std"] == [0.3081]
    assert info["detector"]["threshold"] == pytest.approx(detector.threshold)
    assert 0.5 < info["detector"]["auc"] <= 1.0 and info["detector"]["k"] == detector.k
    assert models[BARE]["detector"] is None


def test_unknown_model_is_404(client):
    assert_problem(client.get("/v1/models/nope"), 404, "unknown_model")
    assert_problem(client.post("/v1/models/nope/screen", json={"tensor": [[0.0]]}), 404, "unknown_model")
    assert_v2_error(client.get("/v2/models/nope"), 404, "unknown_model")
    assert_problem(client.get("/no/such/path"), 404, "not_found")
    assert_problem(client.delete("/v1/models"), 405, "method_not_allowed")


# ---- screen ----

def test_screen_tensor_equals_engine(client, engine, digits, reference):
    module, detector, sha = engine
    images, _ = digits
    response = client.post(f"/v1/models/{MODEL}/screen", json={"tensor": images.tolist()})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == MODEL and body["sha256"] == sha and "detector" in body["method"]
    expected = reference(images)
    assert body["threshold"] == pytest.approx(detector.threshold) and body["threshold_source"] == "detector"
    for i, item in enumerate(body["results"]):
        assert item["score"] == pytest.approx(expected.scores[i], abs=1e-6)
        assert item["adversarial"] == bool(expected.adversarial[i])
        assert item["prediction"] == int(expected.predictions[i]) and item["class_name"] == str(item["prediction"])
        np.testing.assert_allclose(item["eigenvalues"], expected.eigenvalues[i], rtol=1e-4, atol=1e-9)


def test_screen_single_image_forms_agree(client, digits, reference):
    """One digit as [H, W], [C, H, W], base64 PNG, base64 JPEG-free .npy, multipart PNG and multipart .npy."""
    image = digits[0][:1]
    expected = float(reference(image).scores[0])
    png = png_bytes(image[0])
    forms = [
        client.post(f"/v1/models/{MODEL}/screen", json={"tensor": image[0, 0].tolist()}),
        client.post(f"/v1/models/{MODEL}/screen", json={"tensor": image[0].tolist()}),
        client.post(f"/v1/models/{MODEL}/screen", json={"images": [b64(png_bytes(image[0]))]}),
        client.post(f"/v1/models/{MODEL}/screen", json={"images": ["data:image/png;base64," + b64(png)]}),
        client.post(f"/v1/models/{MODEL}/screen", json={"images": [b64(npy_bytes(image.numpy()))]}),
        client.post(f"/v1/models/{MODEL}/screen/upload", files={"files": ("digit.png", png, "image/png")}),
        client.post(f"/v1/models/{MODEL}/screen/upload", files={"files": ("digit.npy", npy_bytes(image.numpy()))}),
        client.post(f"/v1/models/{MODEL}/screen/upload",
                    files={"files": ("rgb.png", png_bytes(image[0], mode="RGB"), "image/png")}),  # RGB -> gray
    ]
    for response in forms:
        assert response.status_code == 200, response.text
        assert response.json()["results"][0]["score"] == pytest.approx(expected, abs=1e-6)


def test_screen_batches(client, digits, reference):
    images, _ = digits
    expected = reference(images).scores
    files = [("files", (f"d{i}.png", png_bytes(images[i]), "image/png")) for i in range(len(images))]
    for response in (
        client.post(f"/v1/models/{MODEL}/screen/upload", files=files),
        client.post(f"/v1/models/{MODEL}/screen", json={"images": [b64(png_bytes(im)) for im in images]}),
        client.post(f"/v1/models/{MODEL}/screen/upload", files={"files": ("b.npy", npy_bytes(images.numpy()))}),
        client.post(f"/v1/models/{MODEL}/screen", json={"tensor": images[:, 0].tolist()}),  # [N, H, W]
    ):
        assert response.status_code == 200, response.text
        scores = [r["score"] for r in response.json()["results"]]
        np.testing.assert_allclose(scores, expected, atol=1e-6)


def test_screen_threshold_override_and_scaling(client, digits):
    images = digits[0][:3]
    body = client.post(f"/v1/models/{MODEL}/screen", json={"tensor": images.tolist(), "threshold": 0.0}).json()
    assert body["threshold_source"] == "request" and all(r["adversarial"] for r in body["results"])
    scaled = client.post(f"/v1/models/{MODEL}/screen", json={"tensor": (images * 255).round().tolist()}).json()
    plain = client.post(f"/v1/models/{MODEL}/screen", json={"tensor": images.tolist()}).json()
    assert any("0-255" in note for note in scaled["notes"]) and not plain["notes"]
    np.testing.assert_allclose([r["score"] for r in scaled["results"]], [r["score"] for r in plain["results"]],
                               atol=1e-5)
    form = client.post(f"/v1/models/{MODEL}/screen/upload", data={"threshold": "1.0"},
                       files={"files": ("d.png", png_bytes(images[0]), "image/png")}).json()
    assert form["threshold"] == 1.0 and form["threshold_source"] == "request"


def test_each_image_is_scaled_on_its_own_and_a_nudged_pixel_is_refused(client, digits, reference):
    """0-255 is decided per image: an 8-bit image in a batch does not rescale the others; a [0, 1] image with a
    pixel pushed past 1 (a way to have an adversarial image screened 255 times darker) is refused."""
    images = digits[0][:3]
    mixed = images.clone()
    mixed[1] = (mixed[1] * 255).round()
    body = client.post(f"/v1/models/{MODEL}/screen", json={"tensor": mixed.tolist()}).json()
    assert body["notes"] == ["8-bit images (whole numbers 0-255) were divided by 255: image 1"]
    expected = reference(images)
    np.testing.assert_allclose([r["score"] for r in body["results"]], expected.scores, atol=1e-5)
    assert [r["prediction"] for r in body["results"]] == expected.predictions.tolist()
    nudged = images.clone()
    nudged[2, 0, 5, 5] = 1.0001
    response = client.post(f"/v1/models/{MODEL}/screen", json={"tensor": nudged.tolist()})
    assert_problem(response, 422, "out_of_range")
    assert "image 2" in response.json()["detail"]


def test_base64_with_line_breaks_and_the_url_safe_alphabet(client, digits, reference):
    data = png_bytes(digits[0][0])
    expected = float(reference(digits[0][:1]).scores[0])
    wrapped = "\n".join(b64(data)[i:i + 76] for i in range(0, len(b64(data)), 76))  # as `base64` prints it
    urlsafe = base64.urlsafe_b64encode(data).decode()
    for text in (wrapped, urlsafe):
        response = client.post(f"/v1/models/{MODEL}/screen", json={"images": [text]})
        assert response.status_code == 200, response.text
        assert response.json()["results"][0]["score"] == pytest.approx(expected, abs=1e-6)


def test_screen_resize_only_when_asked(client, digits):
    big = torch.nn.functional.interpolate(digits[0][:1], size=(40, 40), mode="bilinear")[0]
    data = png_bytes(big)
    assert_problem(client.post(f"/v1/models/{MODEL}/screen", json={"images": [b64(data)]}), 422, "wrong_shape")
    body = client.post(f"/v1/models/{MODEL}/screen", json={"images": [b64(data)], "resize": True}).json()
    assert "resized to 28x28" in body["notes"]
    jpeg = png_bytes(big, fmt="JPEG")
    response = client.post(f"/v1/models/{MODEL}/screen/upload", data={"resize": "true"},
                           files={"files": ("d.jpg", jpeg, "image/jpeg")})
    assert response.status_code == 200, response.text


def test_screen_without_detector_is_404(client, digits):
    body = assert_problem(client.post(f"/v1/models/{BARE}/screen", json={"tensor": digits[0][:1].tolist()}), 404,
                          "no_detector")
    assert "train-detector" in body["detail"]


# ---- spectrum ----

def test_spectrum_equals_engine(client, engine, digits):
    module, _, sha = engine
    images = digits[0][:4]
    response = client.post(f"/v1/models/{MODEL}/spectrum", json={"tensor": images.tolist(), "k": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = fisher_spectrum(module, images, k=5)
    assert body["method"] == expected.method == "exact" and body["sha256"] == sha and body["k"] == 5
    for i, item in enumerate(body["results"]):
        np.testing.assert_allclose(item["eigenvalues"], expected.eigenvalues[i].numpy(), rtol=1e-5, atol=1e-10)
        np.testing.assert_allclose(item["probabilities"], expected.probabilities[i].numpy(), rtol=1e-5, atol=1e-7)
        assert item["prediction"] == int(expected.predictions[i])
        assert item["eigenvectors"] is None and item["eigenvectors_png"] is None


def test_spectrum_vectors_and_methods(client, engine, digits):
    module, _, _ = engine
    image = digits[0][:1]
    body = client.post(f"/v1/models/{MODEL}/spectrum", json={"tensor": image.tolist(), "k": 2,
                                                            "vectors": "both"}).json()
    item = body["results"][0]
    vectors = np.asarray(item["eigenvectors"])
    assert vectors.shape == (2, 1, 28, 28)
    np.testing.assert_allclose(np.linalg.norm(vectors.reshape(2, -1), axis=1), 1.0, atol=1e-4)
    assert len(item["eigenvectors_png"]) == 2
    assert Image.open(io.BytesIO(base64.b64decode(item["eigenvectors_png"][0]))).size == (28, 28)
    power = client.post(f"/v1/models/{MODEL}/spectrum", json={"tensor": image.tolist(), "k": 1,
                                                             "method": "power"}).json()
    assert power["method"] == "power"
    exact = fisher_spectrum(module, image, k=1).eigenvalues[0, 0].item()
    assert power["results"][0]["eigenvalues"][0] == pytest.approx(exact, rel=0.05)
    upload = client.post(f"/v1/models/{MODEL}/spectrum/upload", data={"k": "3", "method": "lanczos"},
                         files={"files": ("d.png", png_bytes(image[0]), "image/png")})
    assert upload.status_code == 200, upload.text
    assert upload.json()["method"] == "lanczos" and len(upload.json()["results"][0]["eigenvalues"]) == 3


# ---- attack ----

def test_ossa_equals_engine(client, engine, digits):
    module, _, sha = engine
    images, labels = digits[0][:3], digits[1][:3]
    response = client.post(f"/v1/models/{MODEL}/attack", json={
        "tensor": images.tolist(), "attack": "ossa", "epsilon": 3.0, "labels": labels.tolist(), "output": "both"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["method"] == "ossa" and body["sha256"] == sha and body["epsilon"] == 3.0
    expected = ossa(module, images, labels, epsilon=3.0)
    for i, item in enumerate(body["results"]):
        assert item["perturbation_norm"] == pytest.approx(float(expected.perturbation_norm[i]), rel=1e-4)
        assert item["top_eigenvalue"] == pytest.approx(float(expected.extras["top_eigenvalue"][i]), rel=1e-5)
        assert item["fooled"] == bool(expected.fooled[i]) and item["label"] == int(labels[i])
        assert item["original_prediction"] == int(expected.original_prediction[i])
        assert item["adversarial_prediction"] == int(expected.adversarial_prediction[i])
        np.testing.assert_allclose(item["adversarial"], expected.adversarial[i].numpy(), atol=1e-5)
        png = Image.open(io.BytesIO(base64.b64decode(item["adversarial_png"])))
        assert png.size == (28, 28) and png.mode == "L"


@pytest.mark.parametrize("attack, extra", [
    ("iterative-ossa", {"steps": 3, "step_size": 0.5}), ("fgm", {}), ("otcm", {}), ("bim", {"steps": 3}),
    ("opt", {"steps": 5}), ("least-norm", {"base_attack": "fgm"}),
])
def test_other_attacks(client, digits, attack, extra):
    images = digits[0][:2]
    response = client.post(f"/v1/models/{MODEL}/attack", json={"tensor": images.tolist(), "attack": attack,
                                                              "epsilon": 2.0, "output": "tensor", **extra})
    assert response.status_code == 200, response.text
    for item in response.json()["results"]:
        assert item["perturbation_norm"] <= 2.0 + 1e-4 and item["top_eigenvalue"] > 0
        assert np.asarray(item["adversarial"]).shape == (1, 28, 28) and item["adversarial_png"] is None
        if attack == "least-norm":
            assert item["found"] is not None


def test_attack_upload_and_limits(client, digits):
    image = digits[0][0]
    response = client.post(f"/v1/models/{MODEL}/attack/upload", data={"attack": "ossa", "epsilon": "2.5"},
                           files={"files": ("d.png", png_bytes(image), "image/png")})
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["adversarial_png"]
    many = digits[0][:5].tolist()  # the fixture's max_attack_batch is 4
    body = assert_problem(client.post(f"/v1/models/{MODEL}/attack", json={"tensor": many, "attack": "bim"}), 422,
                          "too_heavy")
    assert body["jobs"] == "/v1/jobs" and "/v1/jobs" in body["detail"]
    assert_problem(client.post(f"/v1/models/{MODEL}/attack", json={"tensor": many[:1], "attack": "bim",
                                                                   "steps": 51}), 422, "too_heavy")
    assert client.post(f"/v1/models/{MODEL}/attack", json={"tensor": many, "attack": "fgm"}).status_code == 200
    assert_problem(client.post(f"/v1/models/{MODEL}/attack", json={"tensor": many[:1], "epsilon": 11}), 422,
                   "epsilon_out_of_range")
    assert_problem(client.post(f"/v1/models/{MODEL}/attack", json={"tensor": many[:1], "epsilon": -1}), 422,
                   "validation_error")
    assert_problem(client.post(f"/v1/models/{MODEL}/attack", json={"tensor": many[:2], "labels": [1]}), 422,
                   "invalid_labels")
    assert_problem(client.post(f"/v1/models/{MODEL}/attack", json={"tensor": many[:1], "labels": [10]}), 422,
                   "invalid_labels")
    for label in (-1, 2**70):  # a huge JSON integer used to surface numpy's "Overflow when unpacking long long"
        assert_problem(client.post(f"/v1/models/{MODEL}/attack", json={"tensor": many[:1], "labels": [label]}), 422,
                       "validation_error")


# ---- Open Inference Protocol v2 ----

def test_v2_metadata_and_infer(client, engine, digits, reference):
    module, detector, sha = engine
    meta = client.get(f"/v2/models/{MODEL}").json()
    assert meta["name"] == MODEL and meta["versions"] == [sha] and meta["platform"] == "pytorch_libtorch"
    assert meta["inputs"][0]["shape"] == [-1, 1, 28, 28]
    assert {o["name"] for o in meta["outputs"]} == {"logits", "probabilities", "predictions", "adversarial_score",
                                                    "adversarial"}
    assert client.get(f"/v2/models/{MODEL}/ready").json()["ready"] is True
    images = digits[0][:3]
    request = {"id": "r1", "inputs": [{"name": "input", "shape": [3, 1, 28, 28], "datatype": "FP32",
                                       "data": images.flatten().tolist()}]}
    response = client.post(f"/v2/models/{MODEL}/infer", json=request)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == MODEL and body["model_version"] == sha and body["id"] == "r1"
    assert body["parameters"]["sha256"] == sha and "detector" in body["parameters"]["method"]
    outputs = {o["name"]: o for o in body["outputs"]}
    with torch.no_grad():
        logits = module(images)
    assert outputs["logits"]["shape"] == [3, 10]
    np.testing.assert_allclose(np.reshape(outputs["logits"]["data"], (3, 10)), logits.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(outputs["adversarial_score"]["data"], reference(images).scores, atol=1e-6)
    uint8 = {"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "UINT8",
                         "data": (images[0] * 255).round().int().flatten().tolist()}],
             "outputs": [{"name": "predictions"}]}
    small = client.post(f"/v2/models/{MODEL}/infer", json=uint8).json()
    assert [o["name"] for o in small["outputs"]] == ["predictions"]
    assert small["outputs"][0]["data"][0] == int(logits[0].argmax())
    bad = dict(request, inputs=[dict(request["inputs"][0], shape=[2, 1, 28, 28])])
    body = assert_v2_error(client.post(f"/v2/models/{MODEL}/infer", json=bad), 422, "wrong_shape")
    assert body["error"] == "data has 2352 values but shape [2, 1, 28, 28] needs 1568"
    assert_v2_error(client.post(f"/v2/models/{MODEL}/infer", json=dict(request, outputs=[{"name": "x"}])), 422,
                   "unknown_output")
    assert_v2_error(client.post(f"/v2/models/{MODEL}/infer", json={"inputs": [dict(request["inputs"][0],
                                                                                  datatype="STRING")]}),
                   422, "unsupported_datatype")
    def infer(**changes):
        return client.post(f"/v2/models/{MODEL}/infer", json={"inputs": [dict(request["inputs"][0], **changes)]})

    assert_v2_error(infer(shape=[2**60 + 2, 1, 28, 28]), 422, "wrong_shape")  # element count past int64
    assert_v2_error(infer(shape=[2**32, 2**32, 1, 1], data=[]), 422, "wrong_shape")
    assert_v2_error(infer(shape=[1, 1, 0, 28], data=[]), 422, "wrong_shape")
    assert_v2_error(infer(datatype="fp32"), 422, "unsupported_datatype")  # OIP datatypes are upper case
    assert_v2_error(infer(datatype="UINT8"), 422, "invalid_tensor")  # the digits' values are not whole numbers
    assert_v2_error(infer(datatype="BOOL", data=[2] * 784 * 3), 422, "invalid_tensor")
    assert_v2_error(infer(data=["0.5"] * 784 * 3), 422, "invalid_tensor")
    dark = infer(datatype="UINT8", shape=[1, 1, 28, 28], data=[1] * 784).json()  # 1/255, not 1.0
    bright = client.post(f"/v1/models/{MODEL}/screen", json={"tensor": np.full((28, 28), 1 / 255).tolist()}).json()
    assert {o["name"]: o for o in dark["outputs"]}["predictions"]["data"] == [bright["results"][0]["prediction"]]
    bare = client.post(f"/v2/models/{BARE}/infer", json=request).json()
    assert "adversarial_score" not in {o["name"] for o in bare["outputs"]}


# ---- micro-batching, overload, timeouts ----

def test_concurrent_requests_are_batched_and_correct(client, app, digits, reference):
    images = digits[0]
    expected = reference(images).scores
    results: dict[int, float] = {}

    def one(i: int) -> None:
        body = client.post(f"/v1/models/{MODEL}/screen", json={"tensor": images[i].tolist()}).json()
        results[i] = body["results"][0]["score"]

    before = app.state.metrics.batch_size.labels(MODEL, "screen")._sum.get()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # batches of other sizes round differently in float32, and a near-degenerate eigenvector (v2, v3) can turn
    # within its eigenspace, which moves its shape features: a few of the forest's 300 trees may vote otherwise
    np.testing.assert_allclose([results[i] for i in range(len(images))], expected, atol=0.01)
    assert app.state.metrics.batch_size.labels(MODEL, "screen")._sum.get() - before == len(images)




def test_requests_to_micro_batched_endpoints_are_announced_to_their_model(client, app):
    """The endpoints marked `micro_batched` (and only they) count a request as arriving at its model."""
    from service.api.app import arrival_announcer

    announce = arrival_announcer(app)
    worker = app.state.models[MODEL].worker
    for path in (f"/v1/models/{MODEL}/screen", f"/v1/models/{MODEL}/screen/upload", f"/v1/models/{MODEL}/spectrum",
                 f"/v2/models/{MODEL}/infer", f"/v2/models/{MODEL}/versions/any/infer"):
        arrival = announce({"method": "POST", "path": path})
        assert arrival is not None and arrival.worker is worker and worker.arriving >= 1, path
        arrival.close()
    for method, path in (("POST", f"/v1/models/{MODEL}/attack"), ("GET", f"/v1/models/{MODEL}"),
                         ("POST", "/v1/models/nope/screen"), ("POST", "/v1/jobs")):
        assert announce({"method": method, "path": path}) is None, path
