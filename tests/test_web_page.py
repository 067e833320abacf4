"""The web page at `/`, and `/docs` and `/redoc`, served by a real `fisher-guard serve` with API keys, in a real
headless browser (Debian's chromium through selenium, no driver download): the page asks for the key, loads with
no console error, an upload shows the verdict the API gives, the OSSA image appears with its perturbation and its
own screen, a job shows its progress; swagger-ui and ReDoc render the schema's operations from same-origin assets.
Screenshots go to $TEST_ARTIFACTS_DIR/web (default test-artifacts/web at the repository root)."""

from __future__ import annotations

import base64
import io
import os
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from support import png
from test_e2e import MODEL, REPO, start_server, stop_server

from service.data.mnist import load_mnist

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1700")
KEY = "web-page-key-5c1e"
WAIT_S = 120  # the longest a step may take on a busy machine before the test gives up (not a timing assertion)
UPLOADED = 3  # the test digit the tests upload (the model predicts it right)
PICKED = 0  # the test digit the tests pick from the page's list
EPSILON = 3.0
ASSET_TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png", ".svg": "image/svg+xml",
               ".json": "application/json"}


def artifacts_dir() -> Path:
    folder = Path(os.environ.get("TEST_ARTIFACTS_DIR", REPO / "test-artifacts")) / "web"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def server(api_models_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("web") / "server.log"
    base, process = start_server(api_models_dir, log, FISHER_GUARD_API_KEYS=KEY)
    yield base
    stop_server(process)


@pytest.fixture(scope="module")
def keyed(server):
    with httpx.Client(base_url=server, headers={"X-API-Key": KEY}, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_mnist("test")
    return images.numpy(), labels.numpy()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("chromium is not installed (apt-get install chromium chromium-driver; .ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


def console_errors(driver) -> list[str]:
    """The SEVERE entries of the browser's console since the last call (JS errors, failed loads)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def wait_for(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S).until(lambda d: condition(d), message=f"waiting for {what}")


def loaded(driver, element_id: str) -> bool:
    return driver.execute_script(f"const i = document.getElementById('{element_id}'); "
                                 "return !!i && i.complete && i.naturalWidth > 0 && !i.closest('[hidden]');")


def screenshot(driver, name: str) -> None:
    driver.save_screenshot(str(artifacts_dir() / f"{name}.png"))


def decoded(b64_png: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64_png))))


def same_origin_assets(html: str) -> list[str]:
    """Every src / href / url the HTML names; the test requires each to be a path on this origin."""
    return re.findall(r"""(?:src|href|spec-url)=["']([^"']+)["']|url:\s*['"]([^'"]+)['"]""", html)


# ---- without a browser ----

@pytest.mark.parametrize("page", ["/", "/docs", "/redoc"])
def test_pages_are_public_and_name_only_assets_this_server_serves(server, page):
    response = httpx.get(f"{server}{page}", timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    references = [a or b for a, b in same_origin_assets(response.text)]
    assert references, "the page names no assets"
    for reference in references:
        if not reference.startswith("/") or reference.startswith("//"):
            assert reference.startswith("#"), f"{page} names {reference}, not a path on this origin"
            continue
        asset = httpx.get(f"{server}{reference}", timeout=30)
        assert asset.status_code == 200, f"{page} names {reference}, which answers {asset.status_code}"
        suffix = Path(reference).suffix
        if suffix in ASSET_TYPES:
            assert asset.headers["content-type"].startswith(ASSET_TYPES[suffix]), (reference, asset.headers)
        elif reference.startswith("/docs") or reference == "/redoc":
            assert asset.headers["content-type"].startswith("text/html")
    if page == "/":
        policy = response.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "script-src 'self'" in policy


@pytest.mark.parametrize("path", ["/web/index.htm", "/web/..%2Fweb%2Fapp.js", "/web/%2e%2e%2frouters%2fweb.py",
                                  "/docs/assets/core.py", "/docs/assets/..%2Fcore.py"])
def test_only_the_listed_assets_are_served(server, path):
    response = httpx.get(f"{server}{path}", timeout=30)
    assert response.status_code == 404 and response.headers["content-type"] == "application/problem+json"


def test_samples_are_the_bundled_test_digits(server, keyed, digits):
    images, labels = digits
    listing = keyed.get("/v1/samples").json()
    assert listing["dataset"] == "mnist:test" and listing["shape"] == [1, 28, 28]
    assert listing["count"] == len(labels) and listing["labels"] == labels.tolist()
    for index in (0, 417, len(labels) - 1):
        response = keyed.get(f"/v1/samples/{index}")
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        pixels = np.asarray(Image.open(io.BytesIO(response.content)))
        assert np.array_equal(pixels, (images[index, 0] * 255).round().astype(np.uint8))
        assert response.headers["x-label"] == str(labels[index])
    missing = keyed.get(f"/v1/samples/{len(labels)}")
    assert missing.status_code == 404 and missing.json()["code"] == "sample_not_found"
    assert keyed.get("/v1/samples/-1").status_code == 422
    assert httpx.get(f"{server}/v1/samples/0", timeout=30).status_code == 401


def test_attack_answers_its_perturbation_as_png(keyed, digits):
    images, _ = digits
    files = {"files": ("d.png", png(images[UPLOADED]), "image/png")}
    item = keyed.post(f"/v1/models/{MODEL}/attack/upload", files=files,
                      data={"epsilon": str(EPSILON), "output": "both"}).json()["results"][0]
    delta = np.asarray(item["adversarial"], dtype=np.float64) - (images[UPLOADED] * 255).round() / 255
    scale = np.abs(delta).max()
    assert scale > 0 and np.linalg.norm(delta) == pytest.approx(item["perturbation_norm"], rel=1e-4)
    expected = np.round((0.5 + 0.5 * delta / scale)[0] * 255)
    assert np.abs(decoded(item["perturbation_png"]).astype(np.float64) - expected).max() <= 1


# ---- in the browser ----

def test_page_asks_for_the_key_then_loads(server, browser):
    browser.get(f"{server}/")
    wait_for(browser, lambda d: "needs an API key" in d.find_element("id", "message").text, "the key prompt")
    assert console_errors(browser) == []
    browser.find_element("id", "api-key").send_keys(KEY)
    browser.find_element("id", "use-key").click()
    wait_for(browser, lambda d: d.execute_script(
        "const imgs = [...document.querySelectorAll('#digits img')];"
        "return imgs.length === 20 && imgs.every(i => i.complete && i.naturalWidth === 28);"), "the digits")
    assert browser.find_element("id", "model").get_attribute("value") == MODEL
    assert not browser.find_element("id", "message").is_displayed()
    screenshot(browser, "1-loaded")
    assert console_errors(browser) == []


def test_an_upload_shows_the_apis_verdict_and_spectrum(server, keyed, browser, digits, tmp_path):
    images, labels = digits
    image = tmp_path / "upload.png"
    image.write_bytes(png(images[UPLOADED]))
    browser.find_element("id", "upload").send_keys(str(image))
    verdict = wait_for(browser, lambda d: d.find_element("id", "verdict").get_attribute("data-adversarial") and
                       d.find_element("id", "verdict"), "the verdict")
    files = {"files": ("upload.png", image.read_bytes(), "image/png")}
    expected = keyed.post(f"/v1/models/{MODEL}/screen/upload", files=files).json()["results"][0]
    assert int(verdict.get_attribute("data-prediction")) == expected["prediction"] == labels[UPLOADED]
    assert float(verdict.get_attribute("data-score")) == pytest.approx(expected["score"], abs=1e-9)
    assert verdict.get_attribute("data-adversarial") == str(expected["adversarial"]).lower()
    assert verdict.text.startswith("adversarial" if expected["adversarial"] else "clean")
    spectrum = keyed.post(f"/v1/models/{MODEL}/spectrum/upload", files=files, data={"k": "10"}).json()["results"][0]
    wait_for(browser, lambda d: d.execute_script(
        "return [...document.querySelectorAll('#eigenvectors img')].filter(i => i.naturalWidth === 28).length") == 5,
        "the eigenvector images")
    chart = browser.find_element("id", "eigen-chart")
    assert int(chart.get_attribute("data-bars")) == sum(v > 0 for v in spectrum["eigenvalues"])
    assert len(chart.find_elements("css selector", "rect.bar")) == sum(v > 0 for v in spectrum["eigenvalues"])
    screenshot(browser, "2-upload-screened")
    assert console_errors(browser) == []


def test_ossa_shows_the_adversarial_image_its_perturbation_and_its_screen(server, keyed, browser, digits):
    images, _ = digits
    browser.execute_script("const e = document.getElementById('epsilon'); e.value = arguments[0];"
                           "e.dispatchEvent(new Event('input'));", str(EPSILON))
    assert browser.find_element("id", "epsilon-value").text == f"{EPSILON:.1f}"
    browser.find_element("id", "craft").click()
    wait_for(browser, lambda d: all(loaded(d, i) for i in ("attack-original", "attack-perturbation",
                                                           "attack-adversarial")), "the OSSA images")
    verdict = wait_for(browser, lambda d: d.find_element("id", "attack-verdict").get_attribute("data-adversarial")
                       and d.find_element("id", "attack-verdict"), "the adversarial image's screen")
    files = {"files": ("upload.png", png(images[UPLOADED]), "image/png")}
    attack = keyed.post(f"/v1/models/{MODEL}/attack/upload", files=files,
                        data={"epsilon": str(EPSILON)}).json()["results"][0]
    shown = browser.find_element("id", "attack-adversarial").get_attribute("src")
    assert shown == f"data:image/png;base64,{attack['adversarial_png']}"  # OSSA is deterministic
    shown = browser.find_element("id", "attack-perturbation").get_attribute("src")
    assert shown == f"data:image/png;base64,{attack['perturbation_png']}"
    screened = keyed.post(f"/v1/models/{MODEL}/screen", json={"images": [attack["adversarial_png"]]}).json()
    assert float(verdict.get_attribute("data-score")) == pytest.approx(screened["results"][0]["score"], abs=1e-9)
    assert verdict.text.startswith("screen of the adversarial image")
    screenshot(browser, "3-ossa")
    assert console_errors(browser) == []


def test_a_picked_digit_and_a_job_with_its_progress(server, browser, digits):
    _, labels = digits
    browser.find_element("css selector", f"#digits button[data-index='{PICKED}']").click()
    wait_for(browser, lambda d: d.find_element("id", "verdict").get_attribute("data-prediction") ==
             str(labels[PICKED]) and "bundled test digit 0" in d.find_element("id", "chosen-name").text,
             "the picked digit's verdict")
    assert not browser.find_element("id", "attack-result").is_displayed(), "the last image's attack is still shown"
    browser.find_element("id", "submit-job").click()
    row = wait_for(browser, lambda d: (d.find_elements("css selector", "#job-rows tr[data-status='succeeded']")
                                       or [None])[0], "the job to succeed")
    assert "screen" in row.text and "50/50" in row.text
    assert row.find_element("tag name", "progress").get_attribute("value") == "50"
    screenshot(browser, "4-job")
    assert console_errors(browser) == []


def test_swagger_ui_renders_every_operation_offline(server, browser):
    schema = httpx.get(f"{server}/openapi.json", timeout=30).json()
    operations = sum(len([m for m in item if m in ("get", "post", "put", "delete", "patch")])
                     for item in schema["paths"].values())
    browser.get(f"{server}/docs")
    wait_for(browser, lambda d: len(d.find_elements("css selector", ".opblock")) == operations,
             f"swagger-ui to show {operations} operations")
    assert browser.find_elements("css selector", ".btn.authorize"), "the API key schemes are offered"
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(r.startswith(server) for r in resources), resources
    screenshot(browser, "5-docs")
    assert console_errors(browser) == []


def test_redoc_renders_offline(server, browser):
    schema = httpx.get(f"{server}/openapi.json", timeout=30).json()
    browser.get(f"{server}/redoc")
    wait_for(browser, lambda d: d.find_elements("css selector", "[data-section-id^='operation/']"),
             "ReDoc's operations")
    assert schema["info"]["title"] in browser.find_element("tag name", "h1").text
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(r.startswith(server) for r in resources), resources
    screenshot(browser, "6-redoc")
    assert console_errors(browser) == []
