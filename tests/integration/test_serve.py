"""The Serve app over real loopback HTTP: answers, the body forms, every error status, batching, limits, and
the web page in a real headless Chromium (Debian's `chromium`, which `make test` installs) driven by Playwright."""

from __future__ import annotations

import base64
import contextlib
import io
import re
import shutil
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import replace

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from PIL import Image

from c3ae_ray.images import decode_image
from c3ae_ray.model import BUNDLED_MODEL
from c3ae_ray.api import API_KEY_ENV, ServeConfig
from c3ae_ray.inference import Estimator
from c3ae_ray.serving import APP_NAME, build_app, wait_until_healthy
from tests import fixtures, hostile
from tests.fixtures import free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def served(ray_session):
    """The Serve app of `c3ae serve` on the session's Ray, over loopback HTTP: yields (base URL, ServeConfig).

    Module-scoped: Serve's replicas hold CPUs, and the training tests after this module need them all back
    (a two-worker run waits forever otherwise)."""
    from ray import serve

    # one replica, so that /v1/stats counts every batch (it asks one replica)
    cfg = ServeConfig(model=str(BUNDLED_MODEL), device="cpu", port=free_port(), max_batch_size=8, replicas=1)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
    url = f"http://{cfg.host}:{cfg.port}"
    wait_until_healthy(url)
    try:
        yield url, cfg
    finally:
        serve.shutdown()


def post_image(url: str, data: bytes, content_type: str = "image/jpeg", **kwargs) -> requests.Response:
    return requests.post(f"{url}/v1/age", data=data, headers={"Content-Type": content_type}, timeout=60, **kwargs)


def redeploy(cfg) -> None:
    """Same model and workers, new ingress settings: Serve updates the app in place."""
    from ray import serve

    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
    wait_until_healthy(f"http://{cfg.host}:{cfg.port}")


def test_every_face_of_the_shared_photos_gets_the_libraries_own_answer(served, shared_data):
    url, _ = served
    estimator = Estimator(BUNDLED_MODEL, device="cpu")
    faces = shared_data / "faces"
    for name, expected_faces in [("multiface.jpg", 6), ("ivan.jpg", 1), ("no-faces.jpg", 0)]:
        data = (faces / name).read_bytes()
        answer = post_image(url, data)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        (local,) = estimator.estimate([decode_image(data)])
        assert len(body["faces"]) == body["n_faces"] == expected_faces == len(local.faces), name
        for served_face, local_face in zip(body["faces"], local.faces):
            np.testing.assert_allclose(served_face["box"], local_face.box, atol=0.06)
            assert served_face["score"] >= 0.9
            assert abs(served_face["age"] - local_face.age) <= 0.05 + 1e-6  # the one inference path: no skew
            distribution = served_face["age_distribution"]
            assert list(distribution) == [f"{b}" for b in range(0, 120, 10)]
            assert abs(sum(distribution.values()) - 1) < 0.01
            assert served_face["gender"] == local_face.gender and abs(served_face["p_female"] - local_face.p_female) <= 0.01
            for end in ("age_low", "age_high"):  # the bundled file's calibrated range, as the library gives it
                assert abs(served_face[end] - getattr(local_face, end)) <= 0.1, end
            assert served_face["age_low"] < served_face["age"] < served_face["age_high"]
            assert "ethnicity" not in served_face
        assert body["model"] == {"name": "c3ae_utkface", "version": body["model"]["version"], "sha256": body["model"]["sha256"],
                                 "age_range_coverage": 0.8}
        assert len(body["model"]["version"]) == 12 and body["request_id"]
        assert answer.headers["x-request-id"] == body["request_id"]
        assert body["image"] == dict(zip(("width", "height"), Image.open(faces / name).size))


def test_two_workers_the_gpu_topology_give_the_cpu_topologys_answers(served, shared_data):
    """`split_workers`: the detector half, then the model half, in two deployments behind the ingress (the
    default on GPUs), here on the CPU: the same faces and ages as the ingress that runs both itself, and each
    half counts the batches it ran. A worker replica killed under load costs no request there: the ingress
    sends the requests it lost again (`AgeAPI.infer`)."""
    import ray

    url, cfg = served
    photos = [(shared_data / "faces" / name).read_bytes() for name in ("multiface.jpg", "ivan.jpg", "no-faces.jpg")]
    one_deployment = [post_image(url, data).json()["faces"] for data in photos]
    redeploy(replace(cfg, split_workers=True))
    try:
        split = [post_image(url, data).json()["faces"] for data in photos]
        stats = requests.get(f"{url}/v1/stats", timeout=30).json()
        with ThreadPoolExecutor(4) as pool:
            answers = [pool.submit(post_image, url, photos[1]) for _ in range(48)]
            wait(answers, return_when=FIRST_COMPLETED)  # answers flow; the rest are in flight or queued
            [finder] = [actor for actor in ray.util.list_named_actors(all_namespaces=True) if "#FaceFinder#" in actor["name"]]
            ray.kill(ray.get_actor(finder["name"], namespace=finder["namespace"]))
            statuses = Counter(answer.result().status_code for answer in answers)
    finally:
        redeploy(cfg)
    assert statuses == {200: 48}, statuses
    assert "age_estimator" not in stats and all(stats[w]["batches"] for w in ("face_finder", "age_predictor"))
    assert [len(faces) for faces in split] == [len(faces) for faces in one_deployment] == [6, 1, 0]
    for two, one in zip(sum(split, []), sum(one_deployment, [])):
        np.testing.assert_allclose(two["box"], one["box"], atol=0.06)
        assert abs(two["age"] - one["age"]) <= 0.05 and two["gender"] == one["gender"]


def test_raw_multipart_and_json_bodies_give_the_same_answer_and_max_faces_caps_it(served, shared_data):
    url, _ = served
    data = (shared_data / "faces" / "multiface.jpg").read_bytes()
    encoded = base64.b64encode(data).decode()
    answers = [
        post_image(url, data),
        requests.post(f"{url}/v1/age", files={"file": ("multiface.jpg", data, "image/jpeg")}, timeout=60),
        requests.post(f"{url}/v1/age", json={"image": encoded}, timeout=60),
        requests.post(f"{url}/v1/age", json={"image": f"data:image/jpeg;base64,{encoded}"}, timeout=60),
    ]
    assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
    ages = [[face["age"] for face in a.json()["faces"]] for a in answers]
    assert all(a == ages[0] for a in ages) and len(ages[0]) == 6
    capped = [
        post_image(url, data, params={"max_faces": 2}),
        requests.post(f"{url}/v1/age", files={"file": ("m.jpg", data, "image/jpeg")}, data={"max_faces": "2"}, timeout=60),
        requests.post(f"{url}/v1/age", json={"image": encoded, "max_faces": 2}, timeout=60),
    ]
    for answer in capped:
        body = answer.json()
        assert [f["age"] for f in body["faces"]] == ages[0][:2] and body["n_faces"] == 6


def png_header_bomb() -> bytes:
    """A small PNG that declares 9000 x 9000 pixels (81 Mpx, over the default cap of 64 Mpx)."""
    stream = io.BytesIO()
    Image.new("1", (9000, 9000)).save(stream, format="PNG")
    return stream.getvalue()


def test_every_bad_input_gets_its_status_in_one_json_envelope_and_the_server_stays_healthy(served, shared_data):
    url, cfg = served
    jpeg = (shared_data / "faces" / "ivan.jpg").read_bytes()
    cases = [
        ("undecodable bytes", dict(data=b"not an image at all", headers={"Content-Type": "image/jpeg"}), 400, "undecodable"),
        ("truncated JPEG header", dict(data=jpeg[:200], headers={"Content-Type": "image/jpeg"}), 400, "undecodable"),
        ("empty body", dict(data=b"", headers={"Content-Type": "image/png"}), 400, "empty"),
        ("malformed JSON", dict(data=b'{"image": ', headers={"Content-Type": "application/json"}), 400, "bad_json"),
        ("JSON without image", dict(json={"picture": "x"}), 400, "bad_json"),
        ("bad base64", dict(json={"image": "%%%not base64%%%"}), 400, "bad_base64"),
        ("multipart without file", dict(files={"photo": ("a.jpg", jpeg, "image/jpeg")}), 400, "bad_multipart"),
        ("max_faces 0", dict(data=jpeg, headers={"Content-Type": "image/jpeg"}, params={"max_faces": 0}), 400, "bad_request"),
        ("max_faces not a number", dict(json={"image": base64.b64encode(jpeg).decode(), "max_faces": "lots"}), 400, "bad_request"),
        ("max_faces Infinity", dict(data=b'{"image": "' + base64.b64encode(jpeg) + b'", "max_faces": Infinity}',
                                    headers={"Content-Type": "application/json"}), 400, "bad_request"),
        ("body over 10 MB", dict(data=b"\xff" * (cfg.limits.max_body_bytes + 1), headers={"Content-Type": "image/jpeg"}), 413, "body_too_large"),
        ("pixel bomb", dict(data=png_header_bomb(), headers={"Content-Type": "image/png"}), 413, "too_large"),
        ("text body", dict(data=b"hello", headers={"Content-Type": "text/plain"}), 415, "unsupported_media_type"),
        ("GIF", dict(data=b"GIF89a", headers={"Content-Type": "image/gif"}), 415, "unsupported_media_type"),
        ("no content type", dict(data=jpeg), 415, "unsupported_media_type"),
        ("multipart text file", dict(files={"file": ("a.txt", b"hello", "text/plain")}), 415, "unsupported_media_type"),
    ]
    for name, request, status, code in cases:
        answer = requests.post(f"{url}/v1/age", timeout=60, **request)
        assert (answer.status_code, answer.json()["error"]["code"]) == (status, code), f"{name}: {answer.text[:300]}"
        assert answer.json()["error"]["message"] and "Traceback" not in answer.text, name
    for method, path, status, code in [("get", "/nowhere", 404, "not_found"), ("get", "/v1/age", 405, "method_not_allowed")]:
        answer = getattr(requests, method)(f"{url}{path}", timeout=30)
        assert (answer.status_code, answer.json()["error"]["code"]) == (status, code)
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200
    assert post_image(url, jpeg).status_code == 200


def test_generated_hostile_requests_get_a_result_or_the_error_envelope_never_a_500(served, shared_data):
    """Hundreds of generated bodies (tests/hostile.py): broken images of five formats, raw, as JSON base64 or
    multipart; JSON of wrong types; malformed base64 and multipart; odd content types. Each answer is a result
    or the error envelope with a 4xx status, and the server answers a real photo afterwards."""
    url, _ = served
    statuses = Counter()

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(hostile.api_requests())
    def check(request):
        form, kwargs = request
        answer = requests.post(f"{url}/v1/age", timeout=60, **kwargs)
        statuses[answer.status_code] += 1
        assert answer.status_code in (200, 400, 413, 415), f"{form}: {answer.status_code} {answer.text[:300]}"
        assert "Traceback" not in answer.text and answer.headers["Content-Type"] == "application/json", form
        document = answer.json()
        if answer.status_code == 200:
            assert document["n_faces"] == len(document["faces"]), form
        else:
            assert set(document) == {"error"} and document["error"]["code"] and document["error"]["message"], form

    check()
    assert sum(statuses.values()) >= 300 and {200, 400, 415} <= set(statuses), statuses
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200
    assert post_image(url, (shared_data / "faces" / "ivan.jpg").read_bytes()).json()["n_faces"] == 1


def test_concurrent_requests_share_batches(served, shared_data):
    url, _ = served
    before = requests.get(f"{url}/v1/stats", timeout=30).json()
    images = [path.read_bytes() for path in fixtures.utk_faces(shared_data / "utkface", 24)]
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda data: post_image(url, data), images))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
    after = requests.get(f"{url}/v1/stats", timeout=30).json()
    assert {"face_finder", "age_predictor"}.isdisjoint(after)  # on CPUs the ingress replica detects and estimates
    for worker in ("age_estimator",):
        new = {int(size): n - before[worker]["batches"].get(size, 0) for size, n in after[worker]["batches"].items()}
        assert sum(size * n for size, n in new.items()) == 24, (worker, new)
        assert max(size for size, n in new.items() if n > 0) > 1, f"{worker} only saw batches of 1: {new}"
    answered = requests.get(f"{url}/v1/stats", params={"since": before["requests"]["answered"]}, timeout=30).json()["requests"]
    assert answered["answered"] - before["requests"]["answered"] == len(answered["recent"]) == 24  # the ingress's request log
    assert all(status == 200 and ms > 0 for status, ms in answered["recent"])


def test_overload_and_timeouts_answer_503_and_504_and_the_limits_change_in_place(served, shared_data):
    url, cfg = served
    jpeg = (shared_data / "faces" / "multiface.jpg").read_bytes()
    try:
        redeploy(replace(cfg, limits=replace(cfg.limits, max_in_flight=1)))
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: post_image(url, jpeg), range(8)))
        statuses = sorted(a.status_code for a in answers)
        assert 200 in statuses and 503 in statuses and set(statuses) <= {200, 503}, statuses
        rejected = next(a for a in answers if a.status_code == 503)
        assert rejected.json()["error"]["code"] == "overloaded" and rejected.headers["retry-after"] == "1"

        # The deadline bounds the wait for a batch (a batch that has started answers): 24 photos at once, at most
        # 8 a batch, with 50 ms each to be taken up
        redeploy(replace(cfg, limits=replace(cfg.limits, timeout_s=0.05)))
        with ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(lambda _: post_image(url, jpeg), range(24)))
        statuses = Counter(a.status_code for a in answers)
        assert statuses[504] > 0 and set(statuses) <= {200, 504}, statuses
        assert {a.json()["error"]["code"] for a in answers if a.status_code == 504} == {"timeout"}
    finally:
        redeploy(cfg)
    assert post_image(url, jpeg).status_code == 200


def test_an_api_key_from_the_environment_guards_the_api_but_not_health_or_the_page(served, shared_data, monkeypatch):
    url, cfg = served
    jpeg = (shared_data / "faces" / "ivan.jpg").read_bytes()
    monkeypatch.setenv(API_KEY_ENV, "s3cret")
    try:
        redeploy(cfg)
        missing = post_image(url, jpeg)
        assert (missing.status_code, missing.json()["error"]["code"]) == (401, "unauthorized")
        wrong = requests.post(f"{url}/v1/age", data=jpeg, headers={"Content-Type": "image/jpeg", "X-API-Key": "guess"}, timeout=60)
        assert wrong.status_code == 401 and "s3cret" not in wrong.text
        bearer = requests.post(f"{url}/v1/age", data=jpeg, headers={"Content-Type": "image/jpeg", "Authorization": "Bearer s3cret"}, timeout=60)
        header = requests.post(f"{url}/v1/age", data=jpeg, headers={"Content-Type": "image/jpeg", "X-API-Key": "s3cret"}, timeout=60)
        assert bearer.status_code == header.status_code == 200
        assert requests.get(f"{url}/v1/stats", timeout=30).status_code == 401
        assert requests.get(f"{url}/healthz", timeout=30).status_code == 200
        assert requests.get(f"{url}/", timeout=30).status_code == 200
    finally:
        monkeypatch.delenv(API_KEY_ENV)
        redeploy(cfg)
    assert post_image(url, jpeg).status_code == 200


def test_the_page_and_the_openapi_description_are_served(served):
    url, _ = served
    page = requests.get(f"{url}/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="file"' in page.text and "http://" not in page.text and "https://" not in page.text  # no CDN
    spec = requests.get(f"{url}/openapi.json", timeout=30).json()
    assert {"/v1/age", "/healthz"} <= set(spec["paths"])
    assert requests.get(f"{url}/docs", timeout=30).status_code == 200


def test_the_page_sends_a_strict_content_policy_and_api_answers_are_never_cached(served, shared_data):
    url, _ = served
    page = requests.get(f"{url}/", timeout=30)
    policy = dict(part.strip().split(" ", 1) for part in page.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'" and policy["connect-src"] == "'self'" and policy["frame-ancestors"] == "'none'"
    assert policy["script-src"].startswith("'sha256-") and "unsafe" not in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff" and page.headers["x-frame-options"] == "DENY"
    answers = [post_image(url, (shared_data / "faces" / "ivan.jpg").read_bytes()), post_image(url, b"not an image"),
               requests.get(f"{url}/healthz", timeout=30), requests.get(f"{url}/nowhere", timeout=30)]
    assert [a.status_code for a in answers] == [200, 400, 200, 404]  # a result, an error envelope, health, no route
    for answer in answers:
        assert answer.headers["cache-control"] == "no-store" and answer.headers["x-content-type-options"] == "nosniff"
        assert "content-security-policy" not in answer.headers


@contextlib.contextmanager
def chromium():
    """Debian's headless Chromium under Playwright (no browser download)."""
    from playwright.sync_api import sync_playwright

    assert shutil.which(CHROMIUM), "Chromium is missing: `make test` installs Debian's chromium package"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"],
        )
        try:
            yield browser
        finally:
            browser.close()


def test_the_api_docs_render_without_internet(served):
    """Swagger UI at /docs draws the POST /v1/age operation with every request outside the server refused."""
    url, _ = served
    refused = []

    def loopback_only(route):
        if route.request.url.startswith(url):
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort()

    with chromium() as browser:
        page = browser.new_page()
        page.route("**/*", loopback_only)
        page.goto(f"{url}/docs")
        operation = page.locator(".opblock-post .opblock-summary-path", has_text="/v1/age")
        operation.wait_for(timeout=30_000)
        assert operation.is_visible() and not refused, refused


def test_uploading_a_photo_shows_one_box_with_a_plausible_age(served, shared_data, tmp_path):
    url, _ = served
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1000, "height": 900})
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        # the page's policy allows its own script and style by hash: a browser that refused one would say so here
        page.on("console", lambda message: errors.append(message.text) if "Content Security Policy" in message.text else None)
        page.goto(f"{url}/")
        assert page.title().startswith("c3ae_ray")
        page.set_input_files("#file", str(shared_data / "faces" / "ivan.jpg"))
        page.wait_for_selector("body[data-state=done]", timeout=60_000)
        boxes = page.locator(".box")
        assert boxes.count() == 1
        label = boxes.first.locator(".age").inner_text()  # "34 (28\u201341) M": age, its range, gender (bundled model)
        age, low, high = (float(n) for n in re.match(r"(\d+) \((\d+)\u2013(\d+)\) M$", label).groups())
        assert 18 <= age <= 45 and low < age < high  # the bundled model on a young man's photo
        assert page.locator("#faces li.face").count() == 1
        assert re.search(r"80% range \(\d+\u2013\d+\), male", page.locator("#faces li.face").inner_text())
        assert "1 face" in page.locator("#status").inner_text()
        box = boxes.first.bounding_box()
        photo = page.locator("#photo").bounding_box()
        assert box["width"] > 10 and photo["x"] <= box["x"] <= photo["x"] + photo["width"]  # drawn on the face
        page.screenshot(path=str(tmp_path / "page.png"))
        assert not errors, errors

        page.set_input_files("#file", str(shared_data / "faces" / "no-faces.jpg"))
        # a locator, not wait_for_function: the page's policy forbids the eval that a string predicate needs
        page.locator("#status", has_text="No face").wait_for(timeout=60_000)
        assert page.locator(".box").count() == 0


def test_the_page_works_at_phone_width_and_by_keyboard(served, shared_data, tmp_path):
    """390 px wide, no mouse: Tab reaches the file chooser, Enter opens it; the face is boxed, nothing scrolls
    sideways, and the page says what the numbers mean and what they must not be used for."""
    url, _ = served
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 390, "height": 844})
        choosers = []
        page.on("filechooser", lambda chooser: choosers.append(chooser))  # before anything happens: the dialog comes to us
        page.goto(f"{url}/")
        for _ in range(5):
            page.keyboard.press("Tab")
            if page.evaluate("document.activeElement.id") == "file":
                break
        assert page.evaluate("document.activeElement.id") == "file", "Tab never reached the file chooser"
        page.keyboard.press("Enter")
        for _ in range(100):
            if choosers:
                break
            page.wait_for_timeout(100)
        assert choosers, "Enter on the focused file input opened no file chooser"
        choosers[0].set_files(str(shared_data / "faces" / "ivan.jpg"))
        page.wait_for_selector("body[data-state=done]", timeout=60_000)
        boxes = page.locator(".box")
        assert boxes.count() == 1 and boxes.first.bounding_box()["width"] > 10
        assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
        assert "must not be used" in page.locator("#meaning").inner_text()
        page.screenshot(path=str(tmp_path / "phone.png"), full_page=True)
