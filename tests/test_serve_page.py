"""The web page of maskport serve in a real headless browser (Playwright driving Chromium): upload an image, type a
prompt, the answer and the masks appear; the overlay drawn by the page's own RLE decoder equals the server's masks
(decoded here by pycocotools) pixel for pixel; a mask's checkbox removes it; Download PNG gives the overlay.

The browser is the system's Chromium (Debian's ``chromium``, which scripts/setup.sh installs when it can), or
``MASKPORT_CHROMIUM``; without one the test is skipped and says why. ``MASKPORT_RECORD_SCREENSHOT=1`` writes the
screenshot the README shows (docs/images/serve-page.png).
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.serve_util import REPO, demo_samples, running


def _chromium() -> str | None:
    env = os.environ.get("MASKPORT_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install chromium, "
                                                         "or set MASKPORT_CHROMIUM): the page test needs a browser")


def _canvas_rgb(page) -> np.ndarray:
    data = page.evaluate("""() => { const c = document.getElementById('view');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height);
        return {w: c.width, h: c.height, px: Array.from(d.data)}; }""")
    return np.asarray(data["px"], np.uint8).reshape(data["h"], data["w"], 4)[..., :3]


def test_page_in_a_browser(demo_export, tmp_path):
    pw = pytest.importorskip("playwright.sync_api")
    from maskport import rle
    from maskport.serve.app import create_app
    from maskport.serve.engine import Replica, model_info

    replica = Replica.load(demo_export, "cpu")
    app = create_app([replica], model_info(demo_export, [replica]))
    s = demo_samples(1)[0]
    original = np.asarray(Image.open(s["image"]).convert("RGB"))
    with running(app) as url, pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 900}, accept_downloads=True)
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('sa2va')")
            page.set_input_files("#file", str(s["image"]))
            page.wait_for_function("document.getElementById('view').width > 1")
            assert np.array_equal(_canvas_rgb(page), original)  # the image as uploaded

            page.fill("#prompt", s["prompt"])
            with page.expect_response(lambda r: r.url.endswith("/v1/segment")) as resp_info:
                page.click("#go")
            api = resp_info.value.json()
            page.wait_for_selector("#mask-0")
            assert page.inner_text("#answer") == api["prediction"] and "[SEG]" in api["prediction"]
            assert page.locator("#masks input[type=checkbox]").count() == len(api["masks"]) >= 1

            # the overlay: the page decoded the RLE itself; pycocotools' decoding gives the expected pixels
            masks = [rle.decode(m) for m in api["masks"]]
            colors = [(0, 120, 255), (255, 48, 48), (40, 200, 80), (255, 190, 0)]  # the page's palette
            expected = original.astype(np.int32)
            for k, m in enumerate(masks):
                expected[m] = (expected[m] + np.asarray(colors[k % 4])) >> 1
            shown = _canvas_rgb(page)
            assert np.array_equal(shown, expected.astype(np.uint8))
            assert not np.array_equal(shown, original)

            shot = tmp_path / "serve-page.png"
            page.screenshot(path=str(shot), full_page=True)
            if os.environ.get("MASKPORT_RECORD_SCREENSHOT") == "1":
                (REPO / "docs" / "images").mkdir(parents=True, exist_ok=True)
                shutil.copyfile(shot, REPO / "docs" / "images" / "serve-page.png")

            # toggle the mask off and on
            page.uncheck("#mask-0")
            if len(masks) == 1:
                assert np.array_equal(_canvas_rgb(page), original)
            page.check("#mask-0")
            assert np.array_equal(_canvas_rgb(page), expected.astype(np.uint8))

            # Download PNG: the overlay, lossless
            with page.expect_download() as dl_info:
                page.click("#download")
            dl = dl_info.value
            target = tmp_path / dl.suggested_filename
            dl.save_as(str(target))
            assert target.suffix == ".png"
            assert np.array_equal(np.asarray(Image.open(target).convert("RGB")), expected.astype(np.uint8))

            # a server error shows as a one-line message on the page
            page.fill("#threshold", "7")
            page.click("#go")
            page.wait_for_function("document.getElementById('status').className === 'err'")
            assert "threshold" in page.inner_text("#status") and "400" in page.inner_text("#status")

            # a pasted image (clipboard event with an image file) replaces the upload
            png = io.BytesIO()
            Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(png, format="PNG")
            page.evaluate("""bytes => { const dt = new DataTransfer();
                dt.items.add(new File([new Uint8Array(bytes)], 'p.png', {type: 'image/png'}));
                document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: dt})); }""", list(png.getvalue()))
            page.wait_for_function("document.getElementById('view').width === 30")
            assert errors == []
        finally:
            browser.close()
