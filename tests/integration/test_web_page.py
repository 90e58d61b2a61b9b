"""The web page in a real headless Chromium (Debian's `chromium`, which `make test` installs) driven by
Playwright: choose ivan.jpg, see one box with an age."""

from __future__ import annotations

import shutil


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def test_uploading_a_photo_shows_one_box_with_a_plausible_age(served, shared_data, tmp_path):
    from playwright.sync_api import sync_playwright

    url, _ = served
    assert shutil.which(CHROMIUM), "Chromium is missing: `make test` installs Debian's chromium package"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"],
        )
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 900})
            errors = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(f"{url}/")
            assert page.title().startswith("c3ae_ray")
            page.set_input_files("#file", str(shared_data / "faces" / "ivan.jpg"))
            page.wait_for_selector("body[data-state=done]", timeout=60_000)
            boxes = page.locator(".box")
            assert boxes.count() == 1
            age = float(boxes.first.locator(".age").inner_text())
            assert 1 <= age <= 100
            assert page.locator("#faces li.face").count() == 1
            assert "1 face" in page.locator("#status").inner_text()
            box = boxes.first.bounding_box()
            photo = page.locator("#photo").bounding_box()
            assert box["width"] > 10 and photo["x"] <= box["x"] <= photo["x"] + photo["width"]  # drawn on the face
            page.screenshot(path=str(tmp_path / "page.png"))
            assert not errors, errors

            page.set_input_files("#file", str(shared_data / "faces" / "no-faces.jpg"))
            page.wait_for_function("document.querySelector('#status').textContent.includes('No face')", timeout=60_000)
            assert page.locator(".box").count() == 0
        finally:
            browser.close()
