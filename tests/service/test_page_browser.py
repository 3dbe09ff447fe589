"""The clinician page in a real browser (Debian's headless chromium) against the real service.

The service runs as `python -m service` on a free loopback port. Its models are the embedded
defaults when the repository ships them (models/classification and models/segmentation), else a
registry of rigged tiny models (page_support.publish_rigged_models) that always outline the mass
of the synthetic scan. One screenshot per state goes to test-artifacts/page/.
"""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from page_support import (
    CHROMIUM,
    CHROMIUM_ARGS,
    REPO_ROOT,
    SCREENSHOT_DIR,
    multiframe_dicom_bytes,
    publish_rigged_models,
    running_service,
    scan_png_bytes,
)
from PIL import Image

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason=f"{CHROMIUM} not installed (Debian package chromium; .ci/install-browser.sh)",
    ),
]

EMBEDDED_DEFAULTS = (REPO_ROOT / "models" / "diagnosis").is_dir() or all(
    (REPO_ROOT / "models" / task).is_dir() for task in ("classification", "segmentation")
)
WIDE = {"width": 1280, "height": 800}
NARROW = {"width": 380, "height": 800}
TIMEOUT_MS = 20_000


@pytest.fixture(scope="module")
def service_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("page-service")
    if EMBEDDED_DEFAULTS:
        env = {"MODEL_DIR": str(REPO_ROOT / "models")}
    else:
        publish_rigged_models(tmp / "models")
        env = {"MODEL_DIR": str(tmp / "models")}
    env |= {"RELOAD_INTERVAL_S": "0", "LOG_FORMAT": "text", "GRACEFUL_SHUTDOWN_S": "0"}
    with running_service(env, tmp / "service.log") as url:
        yield url


PAGE_KEY_ID = "page-test"


@pytest.fixture(scope="module")
def keyed_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(url, key) of a service that requires an API key, on the rigged models."""
    from service.auth import keys_file_line
    from service.keys import new_key

    tmp = tmp_path_factory.mktemp("keyed-service")
    publish_rigged_models(tmp / "models")
    key = new_key()
    (tmp / "api_keys").write_text(keys_file_line(PAGE_KEY_ID, ["infer"], key) + "\n")
    env = {
        "MODEL_DIR": str(tmp / "models"),
        "API_KEYS_FILE": str(tmp / "api_keys"),
        "RELOAD_INTERVAL_S": "0",
        "LOG_FORMAT": "text",
        "GRACEFUL_SHUTDOWN_S": "0",
    }
    with running_service(env, tmp / "service.log", timeout_s=240) as url:
        yield url, key


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("scans")
    files = {
        "png": ("breast-us.png", scan_png_bytes()),
        "dicom": ("cine.dcm", multiframe_dicom_bytes(n_frames=3)),
        "text": ("notes.txt", b"Follow-up in six months.\n"),
        # 21 MB of a valid PNG header followed by padding: over the 20 MB body limit.
        "huge": ("huge.png", scan_png_bytes() + b"\0" * (21 * 1024 * 1024)),
    }
    paths = {}
    for key, (name, data) in files.items():
        paths[key] = folder / name
        paths[key].write_bytes(data)
    return paths


def open_page(browser: Any, url: str, viewport: dict[str, int]) -> Any:
    page = browser.new_page(viewport=viewport)
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.js_errors = errors
    page.goto(f"{url}/")
    page.wait_for_selector("body[data-state=idle]")
    return page


def upload(page: Any, path: Path) -> int:
    """Choose `path` in the page; return the status of its /diagnose call once the page shows it."""
    with page.expect_response(lambda r: "/diagnose" in r.url) as info:
        page.set_input_files("#file-input", str(path))
    page.wait_for_selector("body[data-state=result], body[data-state=error]")
    return info.value.status


def diagnose(url: str, path: Path, frame: int = 0, include_image: bool = False) -> dict[str, Any]:
    """What the API itself answers for `path`, to compare the page against.

    Asked separately because this chromium build does not hand response bodies to Playwright
    ("evicted from inspector cache"); the models are deterministic, so the answers agree.
    """
    request = urllib.request.Request(
        f"{url}/diagnose?frame={frame}" + ("&include_image=true" if include_image else ""),
        data=path.read_bytes(),
        headers={"Content-Type": "application/octet-stream"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        return json.load(exc)


def screenshot(page: Any, name: str) -> None:
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT_DIR / f"{name}.png"), full_page=True)


def mask_pixels(segmentation: dict[str, Any]) -> int:
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(segmentation["mask_png"]))))
    return int((mask >= 128).sum())


CANVAS_STATS = """(id) => {
  const c = document.getElementById(id);
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let opaque = 0, min = 255, max = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (d[i + 3] > 0) opaque++;
    min = Math.min(min, d[i]); max = Math.max(max, d[i]);
  }
  return {width: c.width, height: c.height, opaque, min, max};
}"""


def assert_finding_shown(page: Any, body: dict[str, Any]) -> None:
    cls = body["classification"]
    assert page.get_attribute("#finding-label", "data-label") == cls["label"]
    bars = page.locator("#probability-bars [role=meter]")
    assert bars.count() == 3
    for name, p in cls["probabilities"].items():
        meter = page.locator(f"#probability-bars li[data-class={name}] [role=meter]")
        assert float(meter.get_attribute("aria-valuenow")) == pytest.approx(100 * p, abs=0.06)
    model = cls["model"]
    assert f"{model['name']} version {model['version']}" in page.inner_text("#classification-model")
    assert page.is_visible("#research-note")


def assert_scan_shown(page: Any, body: dict[str, Any]) -> None:
    scan = page.evaluate(CANVAS_STATS, "scan-canvas")
    assert (scan["width"], scan["height"]) == (body["image"]["width"], body["image"]["height"])
    assert scan["max"] - scan["min"] > 50, "the scan canvas is blank"


def assert_overlay_matches(page: Any, body: dict[str, Any], *, expect_lesion: bool) -> None:
    seg = body["segmentation"]
    if expect_lesion:
        assert seg is not None and seg["bbox"] is not None, body["classification"]
    overlay = page.evaluate(CANVAS_STATS, "overlay-canvas")
    if seg is None or seg["bbox"] is None:
        assert overlay["opaque"] == 0
        assert page.is_hidden("#overlay-controls")
        return
    lesion = mask_pixels(seg)
    assert int(page.get_attribute("#overlay-canvas", "data-lesion-pixels")) == lesion
    assert overlay["opaque"] >= lesion > 0  # the fill, plus an outline drawn over its border
    model = seg["model"]
    assert f"{model['name']} version {model['version']}" in page.inner_text("#segmentation-model")
    assert "Bounding box" in page.inner_text("#lesion-facts")


def test_png_shows_finding_probabilities_and_outlined_lesion(browser, service_url, scans):
    page = open_page(browser, service_url, WIDE)
    status = upload(page, scans["png"])
    body = diagnose(service_url, scans["png"])

    assert status == 200
    assert page.get_attribute("body", "data-state") == "result"
    assert_finding_shown(page, body)
    assert_scan_shown(page, body)
    assert_overlay_matches(page, body, expect_lesion=not EMBEDDED_DEFAULTS)
    assert page.get_attribute("#download-json", "download").endswith(".json")
    screenshot(page, "1-png-result")

    if body["segmentation"] and body["segmentation"]["bbox"]:
        # The toggle, by keyboard: hides the outline, and brings it back.
        page.focus("#overlay-toggle")
        page.keyboard.press("Space")
        assert page.evaluate(CANVAS_STATS, "overlay-canvas")["opaque"] == 0
        page.keyboard.press("Space")
        assert page.evaluate(CANVAS_STATS, "overlay-canvas")["opaque"] > 0
        # The downloaded mask is the service's mask, byte for byte.
        with page.expect_download() as download:
            page.click("#download-mask")
        saved = Path(download.value.path()).read_bytes()
        assert saved == base64.b64decode(body["segmentation"]["mask_png"])
    with page.expect_download() as download:
        page.click("#download-json")
    saved_json = json.loads(Path(download.value.path()).read_text())
    assert saved_json["classification"] == body["classification"]
    assert page.js_errors == []
    page.close()


def test_multiframe_dicom_shows_the_analysed_frame_and_reruns_a_chosen_frame(
    browser, service_url, scans
):
    page = open_page(browser, service_url, WIDE)
    status = upload(page, scans["dicom"])
    body = diagnose(service_url, scans["dicom"])

    assert status == 200, body
    assert body["image"]["format"] == "dicom" and body["image"]["n_frames"] == 3
    assert_finding_shown(page, body)
    # A browser cannot draw DICOM: the page shows the frame the service sends back as image_png.
    if "image_png" not in diagnose(service_url, scans["dicom"], include_image=True):
        pytest.fail(
            "the service does not return image_png for ?include_image=true, so the page "
            "cannot show the analysed DICOM frame"
        )
    assert_scan_shown(page, body)
    assert_overlay_matches(page, body, expect_lesion=not EMBEDDED_DEFAULTS)
    assert page.is_visible("#frame-form")
    assert page.input_value("#frame-input") == "1"
    assert "(1 to 3)" in page.inner_text("#frame-form")

    page.fill("#frame-input", "3")
    with page.expect_response(lambda r: "/diagnose" in r.url) as info:
        page.press("#frame-input", "Enter")
    assert "frame=2" in info.value.url
    page.wait_for_selector("body[data-state=result]")
    body = diagnose(service_url, scans["dicom"], frame=2)
    assert body["image"]["frame"] == 2
    assert "frame 3 of 3" in page.inner_text("#scan-caption")
    assert_finding_shown(page, body)
    assert_overlay_matches(page, body, expect_lesion=not EMBEDDED_DEFAULTS)
    screenshot(page, "2-dicom-frame-3")
    assert page.js_errors == []
    page.close()


def test_text_file_reads_as_a_sentence_not_json(browser, service_url, scans):
    page = open_page(browser, service_url, WIDE)
    status = upload(page, scans["text"])
    body = diagnose(service_url, scans["text"])

    assert status == 415
    assert body["error"]["code"] == "unsupported_format"
    assert page.get_attribute("body", "data-state") == "error"
    message = page.inner_text("#error")
    assert message.startswith("This file is not a PNG, JPEG or DICOM image.")
    assert "{" not in message and "unsupported_format" not in message
    assert page.is_hidden("#results")
    screenshot(page, "3-error-text-file")
    assert page.js_errors == []
    page.close()


def test_file_over_the_body_limit_reads_as_a_sentence(browser, service_url, scans):
    page = open_page(browser, service_url, WIDE)
    page.set_input_files("#file-input", str(scans["huge"]))
    page.wait_for_selector("body[data-state=error]")

    assert page.inner_text("#error").startswith("The file is larger than 20 MB.")
    assert page.js_errors == []
    page.close()


def test_narrow_window_stacks_without_sideways_scrolling(browser, service_url, scans):
    page = open_page(browser, service_url, NARROW)
    upload(page, scans["png"])

    assert page.get_attribute("body", "data-state") == "result"
    assert page.evaluate("document.documentElement.scrollWidth") <= NARROW["width"]
    finding = page.locator(".finding").bounding_box()
    scan = page.locator("#scan-canvas").bounding_box()
    assert finding["y"] < scan["y"], "on a narrow window the finding comes first"
    assert scan["width"] <= NARROW["width"]
    screenshot(page, "4-png-result-narrow")
    assert page.js_errors == []
    page.close()


def test_image_unlike_a_scan_shows_the_warning_and_marks_the_finding(
    browser, service_url, tmp_path
):
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((240, 320), 255, np.uint8)).save(blank)
    page = open_page(browser, service_url, WIDE)
    status = upload(page, blank)
    body = diagnose(service_url, blank)

    assert status == 200
    assert body["quality"]["in_distribution"] is False
    assert page.get_attribute("body", "data-state") == "result"
    assert page.is_visible("#quality-warning")
    reasons = page.locator("#quality-reasons li")
    assert reasons.count() == len(body["quality"]["reasons"]) > 0
    assert page.get_attribute("#finding-label", "data-reliable") == "false"
    assert "not reliable" in page.inner_text("#finding-label")
    screenshot(page, "5-out-of-distribution")
    assert page.js_errors == []
    page.close()


def test_page_asks_for_a_key_when_the_service_requires_one(browser, keyed_service, scans):
    url, key = keyed_service
    page = open_page(browser, url, WIDE)
    with page.expect_response(lambda r: "/diagnose" in r.url) as first:
        page.set_input_files("#file-input", str(scans["png"]))  # no key yet
    assert first.value.status == 401
    page.wait_for_selector("body[data-state=key]")
    assert page.is_visible("#key-form")
    assert "needs an API key" in page.inner_text("#key-prompt")
    screenshot(page, "6-api-key-prompt")

    with page.expect_response(lambda r: "/diagnose" in r.url) as wrong:
        page.fill("#key-input", "busi_not-a-key")
        page.click("#key-button")
    assert wrong.value.status == 401
    page.wait_for_selector("body[data-state=key]")
    assert "not accepted" in page.inner_text("#key-prompt")

    with page.expect_response(lambda r: "/diagnose" in r.url) as right:
        page.fill("#key-input", key)
        page.click("#key-button")
    assert right.value.status == 200
    assert right.value.request.headers["authorization"] == f"Bearer {key}"
    page.wait_for_selector("body[data-state=result]")
    assert page.is_hidden("#key-form")
    assert page.inner_text("#finding-label")
    assert page.evaluate("sessionStorage.length") == 1  # the tab's, not a cookie
    assert page.context.cookies() == []
    screenshot(page, "7-result-with-key")
    assert page.js_errors == []
    page.close()
