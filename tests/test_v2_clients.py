"""The Open Inference Protocol v2 as clients nobody here wrote call it: Triton's `tritonclient.http` and KServe's
`InferenceRESTClient`, unmodified, against `fisher-guard serve` (uvicorn) in its own process. Their answers are
checked against the model run outside the service and against the service's own JSON v2 answer for the same
input; malformed binary bodies get a 400 that says what was wrong; the statistics extension and the Prometheus
queue / compute metrics count what was sent."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput
from support import png
from test_e2e import metric_value, start_server, stop_server
from tritonclient.utils import InferenceServerException

from service.data.mnist import load_mnist

MODEL = "lenet5"
PAYLOAD_LIMIT = 1 << 20
OUTPUTS = ["logits", "probabilities", "predictions", "adversarial_score", "adversarial"]
INFER = "/v2/models/{model_name}/infer"
VERSIONED_INFER = "/v2/models/{model_name}/versions/{model_version}/infer"


@pytest.fixture(scope="module")
def server(api_models_dir, tmp_path_factory):
    """The service in its own process with a 1 MiB body limit; yields its base URL."""
    log = tmp_path_factory.mktemp("v2-clients") / "server.log"
    base, process = start_server(api_models_dir, log, FISHER_GUARD_MAX_PAYLOAD_BYTES=str(PAYLOAD_LIMIT))
    yield base
    stop_server(process)
    assert "Traceback" not in log.read_text()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return load_mnist("test")[0][:4].numpy()  # (4, 1, 28, 28) float32 in [0, 1]


@pytest.fixture(scope="module")
def triton_client(server):
    client = triton.InferenceServerClient(url=server.removeprefix("http://"), network_timeout=60)
    yield client
    client.close()


@pytest.fixture(scope="module")
def expected(server, images, engine):
    """What the service's own JSON v2 path answers for `images` (checked here against the model run outside)."""
    module, _, _ = engine
    body = {"inputs": [{"name": "input", "shape": list(images.shape), "datatype": "FP32",
                        "data": images.flatten().tolist()}]}
    response = httpx.post(f"{server}/v2/models/{MODEL}/infer", json=body, timeout=60)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: np.reshape(o["data"], o["shape"]) for o in response.json()["outputs"]}
    with torch.no_grad():
        logits = module(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(outputs["logits"], logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(outputs["probabilities"], torch.from_numpy(logits).softmax(-1).numpy(), atol=1e-5)
    assert outputs["predictions"].tolist() == logits.argmax(1).tolist()
    return outputs


def assert_same_outputs(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    for name, values in got.items():
        np.testing.assert_allclose(np.asarray(values, dtype=np.float64), np.asarray(expected[name], dtype=np.float64),
                                   rtol=1e-5, atol=1e-6, err_msg=name)


# ---- tritonclient ----

def test_tritonclient_health_metadata_config_and_versions(triton_client, api_models_dir):
    from service.zoo.registry import sha256_file

    sha = sha256_file(api_models_dir / "lenet5.pt")
    assert triton_client.is_server_live() and triton_client.is_server_ready()
    server = triton_client.get_server_metadata()
    assert {"binary_tensor_data", "model_configuration", "statistics"} <= set(server["extensions"])
    meta = triton_client.get_model_metadata(MODEL)
    assert meta["versions"] == [sha] and meta["platform"] == "pytorch_libtorch"
    assert [o["name"] for o in meta["outputs"]] == OUTPUTS
    assert triton_client.get_model_metadata(MODEL, model_version=sha) == meta
    assert triton_client.is_model_ready(MODEL) and triton_client.is_model_ready(MODEL, model_version=sha)
    assert not triton_client.is_model_ready(MODEL, model_version="1")
    with pytest.raises(InferenceServerException) as error:
        triton_client.get_model_metadata(MODEL, model_version="1")
    assert error.value.status() == "404"
    assert error.value.message() == f"model 'lenet5' has no version '1' (its version is {sha})"
    with pytest.raises(InferenceServerException) as error:
        triton_client.get_model_metadata("nope")
    assert error.value.status() == "404" and "no model named 'nope'" in error.value.message()
    config = triton_client.get_model_config(MODEL)
    assert triton_client.get_model_config(MODEL, model_version=sha) == config
    assert config["platform"] == "pytorch_libtorch" and config["backend"] == "pytorch"
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "format": "FORMAT_NCHW",
                                "dims": [1, 28, 28]}]
    outputs = {o["name"]: o for o in config["output"]}
    assert outputs["logits"]["dims"] == [10] and outputs["logits"]["data_type"] == "TYPE_FP32"
    assert outputs["predictions"]["dims"] == [1] and outputs["predictions"]["reshape"] == {"shape": []}
    assert outputs["adversarial"]["data_type"] == "TYPE_BOOL" and config["parameters"]["sha256"]["string_value"] == sha
    assert config["instance_group"][0]["kind"] == "KIND_CPU" and config["max_batch_size"] >= 1


def triton_input(images: np.ndarray, binary: bool, datatype: str = "FP32") -> triton.InferInput:
    tensor = triton.InferInput("input", list(images.shape), datatype)
    tensor.set_data_from_numpy(images, binary_data=binary)
    return tensor


def test_tritonclient_infers_with_binary_and_json_tensors(server, triton_client, images, expected, api_models_dir):
    from service.zoo.registry import sha256_file

    # binary input, no outputs named: tritonclient asks for every output as binary data
    result = triton_client.infer(MODEL, [triton_input(images, binary=True)])
    assert [o["name"] for o in result.get_response()["outputs"]] == OUTPUTS
    assert all("binary_data_size" in o["parameters"] for o in result.get_response()["outputs"])
    got = {name: result.as_numpy(name) for name in OUTPUTS}
    assert got["logits"].dtype == np.float32 and got["predictions"].dtype == np.int64
    assert got["adversarial"].dtype == np.bool_ and got["adversarial_score"].dtype == np.float64
    assert_same_outputs(got, expected)
    # outputs asked for by name, one binary and one JSON; JSON input
    wanted = [triton.InferRequestedOutput("probabilities", binary_data=True),
              triton.InferRequestedOutput("predictions", binary_data=False)]
    result = triton_client.infer(MODEL, [triton_input(images, binary=False)], outputs=wanted, request_id="r-7")
    response = result.get_response()
    assert response["id"] == "r-7" and [o["name"] for o in response["outputs"]] == ["probabilities", "predictions"]
    assert "data" in response["outputs"][1] and "data" not in response["outputs"][0]
    assert_same_outputs({"probabilities": result.as_numpy("probabilities"),
                         "predictions": result.as_numpy("predictions")}, expected)
    # all JSON, on the versioned path; and 8-bit pixels as binary UINT8
    sha = sha256_file(api_models_dir / "lenet5.pt")
    wanted = [triton.InferRequestedOutput(name, binary_data=False) for name in ("logits", "adversarial")]
    result = triton_client.infer(MODEL, [triton_input(images, binary=False)], outputs=wanted, model_version=sha)
    assert result.get_response()["model_version"] == sha
    assert_same_outputs({"logits": result.as_numpy("logits"), "adversarial": result.as_numpy("adversarial")}, expected)
    pixels = (images * 255).round().astype(np.uint8)
    from_bytes = triton_client.infer(MODEL, [triton_input(pixels, binary=True, datatype="UINT8")])
    from_json = httpx.post(f"{server}/v2/models/{MODEL}/infer", timeout=60, json={
        "inputs": [{"name": "input", "shape": list(pixels.shape), "datatype": "UINT8",
                    "data": pixels.flatten().tolist()}]}).json()
    assert_same_outputs({name: from_bytes.as_numpy(name) for name in OUTPUTS},
                        {o["name"]: np.reshape(o["data"], o["shape"]) for o in from_json["outputs"]})


def test_a_request_for_the_models_outputs_alone_runs_no_screen(server, triton_client, images, expected):
    """Asking for logits, probabilities or predictions only: the forward pass answers (the same values), no image
    is screened and no detector is named; asking for a detector output screens every image once."""
    screened = lambda: metric_value(httpx.get(f"{server}/metrics").text,  # noqa: E731
                                    "fisher_guard_images_screened_total", model=MODEL)
    before = screened()
    wanted = [triton.InferRequestedOutput(name) for name in ("logits", "probabilities", "predictions")]
    result = triton_client.infer(MODEL, [triton_input(images, binary=True)], outputs=wanted)
    response = result.get_response()
    assert response["parameters"]["method"] == "forward pass" and "detector_id" not in response["parameters"]
    assert_same_outputs({name: result.as_numpy(name) for name in ("logits", "probabilities", "predictions")},
                        expected)
    assert screened() == before
    result = triton_client.infer(MODEL, [triton_input(images, binary=True)],
                                 outputs=[triton.InferRequestedOutput("adversarial")])
    assert "detector_id" in result.get_response()["parameters"]
    assert_same_outputs({"adversarial": result.as_numpy("adversarial")}, expected)
    assert screened() == before + len(images)


def test_tritonclient_shows_the_error_message(triton_client, images):
    tensor = triton_input(images[:1], binary=True)
    tensor.set_shape([2, 1, 28, 28])  # the shape now says 2 images, the bytes hold 1
    with pytest.raises(InferenceServerException) as error:
        triton_client.infer(MODEL, [tensor])
    assert error.value.status() == "400"
    assert error.value.message() == ("input 'input': shape [2, 1, 28, 28] of FP32 needs 6272 bytes but "
                                     "binary_data_size is 3136")
    with pytest.raises(InferenceServerException) as error:
        triton_client.infer(MODEL, [triton_input(np.zeros((1, 3, 28, 28), np.float32), binary=True)])
    assert error.value.status() == "422" and error.value.message() == "the images have 3 channels but the model takes 1"
    with pytest.raises(InferenceServerException) as error:
        triton_client.infer(MODEL, [triton_input(images, binary=True)], model_version="2")
    assert error.value.status() == "404" and "has no version '2'" in error.value.message()
    with pytest.raises(InferenceServerException) as error:
        triton_client.infer(MODEL, [triton_input(images, binary=True)],
                            outputs=[triton.InferRequestedOutput("logits", class_count=3)])
    assert error.value.status() == "400" and "classification extension is not supported" in error.value.message()


# ---- KServe's client ----

def kserve_infer(base: str, request: InferRequest):
    async def call():
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
        try:
            return await client.infer(base, request, model_name=MODEL)
        finally:
            await client.close()

    return asyncio.run(call())


def test_kserve_client_infers_with_binary_and_json_tensors(server, images, expected):
    for binary in (True, False):
        tensor = InferInput("input", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images, binary_data=binary)
        response = kserve_infer(server, InferRequest(MODEL, [tensor]))
        assert response.model_name == MODEL and [o.name for o in response.outputs] == OUTPUTS
        assert_same_outputs({o.name: o.as_numpy() for o in response.outputs}, expected)
    tensor = InferInput("input", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    asked = [RequestedOutput("adversarial_score", {"binary_data": True}), RequestedOutput("logits")]
    response = kserve_infer(server, InferRequest(MODEL, [tensor], request_outputs=asked))
    assert [o.name for o in response.outputs] == ["adversarial_score", "logits"]
    assert_same_outputs({o.name: o.as_numpy() for o in response.outputs}, expected)


def test_kserve_client_shows_the_error_message(server, images):
    tensor = InferInput("input", [1, 1, 28, 27], "FP32")
    tensor.set_data_from_numpy(images[:1, :, :, :27].copy())
    with pytest.raises(httpx.HTTPStatusError) as error:
        kserve_infer(server, InferRequest(MODEL, [tensor]))
    assert error.value.response.status_code == 422
    assert str(error.value).startswith("the images are 27x28 but the model takes 28x28")


# ---- the binary format's bounds, over raw HTTP ----

def binary_request(header: dict, tensor_bytes: bytes, header_length: str | None = None) -> tuple[bytes, dict]:
    head = json.dumps(header).encode()
    length = str(len(head)) if header_length is None else header_length
    return head + tensor_bytes, {"Inference-Header-Content-Length": length, "Content-Type": "application/octet-stream"}


def one_input(shape: list[int], datatype: str = "FP32", size: object = 3136, **extra: object) -> dict:
    return {"inputs": [{"name": "input", "shape": shape, "datatype": datatype,
                        "parameters": {"binary_data_size": size}, **extra}]}


DIGIT = np.full((1, 1, 28, 28), 0.5, np.float32).tobytes()
MALFORMED = [  # (header, tensor bytes, Inference-Header-Content-Length or None: the right one, what the error says)
    (one_input([1, 1, 28, 28]), DIGIT, "abc", "Inference-Header-Content-Length must be a whole number of bytes"),
    (one_input([1, 1, 28, 28]), DIGIT, "-5", "must be a whole number of bytes, not '-5'"),
    (one_input([1, 1, 28, 28]), DIGIT, "0", "the JSON header cannot be empty"),
    (one_input([1, 1, 28, 28]), DIGIT, str(2**70), f"is {2**70} but the body has only"),
    (one_input([1, 1, 28, 28]), DIGIT, "40", "the request body is not valid JSON"),
    (one_input([1, 1, 28, 28], size=-1), DIGIT, None, "binary_data_size must be a whole number of bytes >= 0, not -1"),
    (one_input([1, 1, 28, 28], size=True), DIGIT, None, "not True"),
    (one_input([1, 1, 28, 28], size=3136.0), DIGIT, None, "not 3136.0"),
    (one_input([1, 1, 28, 28], size="3136"), DIGIT, None, "not '3136'"),
    (one_input([1, 1, 28, 28], size=2**63), DIGIT, None, f"declares binary_data_size {2**63} but only 3136 bytes"),
    (one_input([1, 1, 28, 28], size=3000), DIGIT, None, "136 bytes after the JSON header that no input declares"),
    (one_input([1, 1, 28, 28]), DIGIT[:3000], None, "declares binary_data_size 3136 but only 3000 bytes"),
    (one_input([1, 1, 28, 28], datatype="FP64"), DIGIT, None, "shape [1, 1, 28, 28] of FP64 needs 6272 bytes"),
    (one_input([2**40, 2**40, 28, 28]), DIGIT, None, f"needs {2**80 * 784 * 4} bytes but binary_data_size is 3136"),
    (one_input([1, 1, -28, 28]), DIGIT, None, "shape [1, 1, -28, 28] is not a valid tensor shape"),
    (one_input([1, 1, 28, 28], datatype="BOOL", size=784), bytes([2]) * 784, None, "BOOL bytes must be 0 or 1"),
    (one_input([1, 1, 28, 28], data=[0.0] * 784), DIGIT, None, "has both data and binary_data_size"),
    (one_input([2], datatype="BYTES", size=8), b"\x05\0\0\0abcd", None, "element 0 declares 5 bytes but only 4"),
    (one_input([2], datatype="BYTES", size=7), b"\x03\0\0\0abc", None, "needs at least 8 bytes"),
    (one_input([1], datatype="BYTES", size=7), b"\x01\0\0\0abc", None, "2 bytes are left after the 1 BYTES elements"),
    ({**one_input([1, 1, 28, 28]), "parameters": {"binary_data_output": "yes"}}, DIGIT, None,
     "parameters.binary_data_output must be true or false, not 'yes'"),
    ({**one_input([1, 1, 28, 28]), "outputs": [{"name": "logits", "parameters": {"binary_data": 1}}]}, DIGIT, None,
     "outputs['logits'].parameters.binary_data must be true or false, not 1"),
]


@pytest.mark.parametrize(("header", "tensor_bytes", "length", "message"), MALFORMED,
                         ids=[m[3][:40] for m in MALFORMED])
def test_malformed_binary_bodies_get_a_400_that_says_why(server, header, tensor_bytes, length, message):
    body, headers = binary_request(header, tensor_bytes, length)
    response = httpx.post(f"{server}/v2/models/{MODEL}/infer", content=body, headers=headers, timeout=30)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    assert message in response.json()["error"], response.json()


def test_bodies_over_the_limit_and_other_media_types(server):
    huge = np.zeros((100, 1, 28, 28), np.float32).tobytes()  # 313,600 bytes: over the limit 4 times
    body, headers = binary_request(one_input([400, 1, 28, 28], size=len(huge) * 4), huge * 4)
    response = httpx.post(f"{server}/v2/models/{MODEL}/infer", content=body, headers=headers, timeout=30)
    assert response.status_code == 413 and f"over the limit of {PAYLOAD_LIMIT} bytes" in response.json()["error"]
    response = httpx.post(f"{server}/v2/models/{MODEL}/infer", content=b"x", headers={"Content-Type": "text/plain"})
    assert response.status_code == 415 and "not text/plain" in response.json()["error"]
    response = httpx.post(f"{server}/v2/models/{MODEL}/infer", content=b"x", headers={"Content-Encoding": "gzip"})
    assert response.status_code == 415 and "Content-Encoding 'gzip' is not supported" in response.json()["error"]
    response = httpx.get(f"{server}/v1/models/nope")  # elsewhere, problem documents as before
    assert response.headers["content-type"] == "application/problem+json" and response.json()["code"] == "unknown_model"


def test_encoded_images_as_bytes_tensors(server, images, expected):
    """A BYTES tensor [N] of PNG files (Triton's way to send encoded images) answers as the pixels do."""
    pngs = [png(image) for image in images]
    data = b"".join(len(p).to_bytes(4, "little") + p for p in pngs)
    body, headers = binary_request(one_input([len(pngs)], datatype="BYTES", size=len(data)), data)
    response = httpx.post(f"{server}/v2/models/{MODEL}/infer", content=body, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: np.reshape(o["data"], o["shape"]) for o in response.json()["outputs"]}
    # 8-bit PNGs of the digits: the same pixels to within 1/510
    np.testing.assert_allclose(outputs["logits"], expected["logits"], atol=0.05)
    assert outputs["predictions"].tolist() == expected["predictions"].tolist()


def test_mutated_binary_requests_never_fail_the_server(server):
    """Seeded random damage to a valid binary request (its header length, its JSON, its tensor bytes): every
    answer is 200 or a 4xx in the protocol's error form, never a 5xx."""
    rng = random.Random(7)
    good_body, good_headers = binary_request(one_input([1, 1, 28, 28]), DIGIT)
    head_length = int(good_headers["Inference-Header-Content-Length"])
    statuses = set()
    for _ in range(60):
        body, headers = bytearray(good_body), dict(good_headers)
        damage = rng.choice(["length", "flip", "cut", "grow"])
        if damage == "length":
            headers["Inference-Header-Content-Length"] = str(head_length + rng.randint(-40, 40))
        elif damage == "flip":
            for _ in range(rng.randint(1, 4)):
                body[rng.randrange(head_length)] = rng.randrange(256)
        elif damage == "cut":
            body = body[:rng.randrange(len(body))]
        else:
            body += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        response = httpx.post(f"{server}/v2/models/{MODEL}/infer", content=bytes(body), headers=headers, timeout=30)
        statuses.add(response.status_code)
        assert response.status_code == 200 or 400 <= response.status_code < 500, response.text
        if response.status_code != 200:
            assert response.headers["content-type"] == "application/json" and response.json()["error"]
    assert 400 in statuses


# ---- statistics extension and Prometheus metrics ----

def test_statistics_and_metrics_count_every_request(server, triton_client, images, api_models_dir):
    """N v2 inferences (sequential: one request per model run) and M screens: the v2 statistics and the queue /
    compute histograms count exactly those, their durations are positive and nested (a request's queue wait plus
    compute lies within its answer time), a failed request counts as a failure only; process metrics are there."""
    from service.zoo.registry import sha256_file

    sha = sha256_file(api_models_dir / "lenet5.pt")
    metrics = lambda: httpx.get(f"{server}/metrics").text  # noqa: E731
    stats = lambda: triton_client.get_inference_statistics(MODEL)["model_stats"][0]  # noqa: E731
    before_stats, before = stats(), metrics()
    sent, versioned, screens = 5, 2, 3
    for i in range(sent):
        triton_client.infer(MODEL, [triton_input(images[: 1 + i % 2], binary=i % 2 == 0)],
                            model_version=sha if i < versioned else "")
    for i in range(screens):
        assert httpx.post(f"{server}/v1/models/{MODEL}/screen", json={"tensor": images[i].tolist()},
                          timeout=60).status_code == 200
    with pytest.raises(InferenceServerException):
        triton_client.infer(MODEL, [triton_input(np.zeros((1, 3, 28, 28), np.float32), binary=True)])
    after_stats, after = stats(), metrics()
    assert after_stats["name"] == MODEL and after_stats["version"] == sha
    delta = {key: {part: after_stats["inference_stats"][key][part] - before_stats["inference_stats"][key][part]
                   for part in ("count", "ns")} for key in ("success", "fail", "queue", "compute_infer")}
    assert delta["success"]["count"] == sent and delta["fail"]["count"] == 1
    assert delta["queue"]["count"] == sent and delta["compute_infer"]["count"] == sent
    assert after_stats["execution_count"] - before_stats["execution_count"] == sent
    assert after_stats["inference_count"] - before_stats["inference_count"] == sum(1 + i % 2 for i in range(sent))
    assert delta["compute_infer"]["ns"] > 0 and delta["queue"]["ns"] >= 0 and delta["fail"]["ns"] > 0
    assert delta["queue"]["ns"] + delta["compute_infer"]["ns"] < delta["success"]["ns"]
    assert after_stats["last_inference"] > 0
    assert httpx.get(f"{server}/v2/models/{MODEL}/versions/{sha}/stats").json()["model_stats"][0]["inference_count"] \
        == after_stats["inference_count"]

    def grew(name: str, endpoint: str) -> float:
        return metric_value(after, name, model=MODEL, endpoint=endpoint) - metric_value(before, name, model=MODEL,
                                                                                         endpoint=endpoint)

    for endpoint, count in ((INFER, sent - versioned), (VERSIONED_INFER, versioned),
                            ("/v1/models/{model}/screen", screens)):
        assert grew("fisher_guard_queue_wait_seconds_count", endpoint) == count, endpoint
        assert grew("fisher_guard_compute_seconds_count", endpoint) == count, endpoint
        queue, compute = grew("fisher_guard_queue_wait_seconds_sum", endpoint), grew("fisher_guard_compute_seconds_sum",
                                                                                    endpoint)
        assert compute > 0 and queue >= 0
        answered = grew("fisher_guard_request_duration_seconds_sum", endpoint)
        assert queue + compute < answered, endpoint
    assert metric_value(after, "process_resident_memory_bytes") > 0
    assert metric_value(after, "process_cpu_seconds_total") > 0 and 'python_info{' in after


def test_the_schema_documents_the_protocols_forms(server):
    """The OpenAPI schema says what the v2 paths really send and take: errors as the protocol's JSON, binary
    bodies and answers, the versioned paths; other paths keep problem documents."""
    schema = httpx.get(f"{server}/openapi.json").json()
    infer = schema["paths"][VERSIONED_INFER]["post"]
    assert set(infer["requestBody"]["content"]) == {"application/json", "application/octet-stream"}
    assert set(infer["responses"]["200"]["content"]) == {"application/json", "application/octet-stream"}
    assert infer["responses"]["400"]["content"] == {"application/json": {"schema": {
        "$ref": "#/components/schemas/V2Error"}}}
    for path in ("/v2/models/{model_name}/config", "/v2/models/{model_name}/versions/{model_version}/stats",
                 "/v2/models/stats", "/v2/models/{model_name}/versions/{model_version}/ready"):
        assert "application/json" in schema["paths"][path]["get"]["responses"]["404" if "model_name" in path
                                                                                else "503"]["content"], path
    screen = schema["paths"]["/v1/models/{model}/screen"]["post"]
    assert "application/problem+json" in screen["responses"]["422"]["content"]
