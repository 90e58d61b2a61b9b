"""The HTTP API's settings and request parsing, without Ray."""

from __future__ import annotations

import pytest

from c3ae_ray.api import MODEL_ENV, ApiError, RequestLog, ServeConfig, failure_status, parse_max_faces, traffic_line, web_page
from c3ae_ray.config import UserError, build
from c3ae_ray.model import BUNDLED_MODEL


def test_serve_args_name_the_model_or_take_it_from_the_environment_or_the_bundled_one(monkeypatch):
    monkeypatch.delenv(MODEL_ENV, raising=False)
    assert build(ServeConfig, {"device": "cpu"}).model_location == str(BUNDLED_MODEL)
    with pytest.raises(UserError, match="unknown serve args setting\\(s\\): batch; allowed: model"):
        build(ServeConfig, {"model": "m.pt", "batch": 3}, "serve args")
    monkeypatch.setenv(MODEL_ENV, "/m.pt")
    cfg = build(ServeConfig, {"limits": {"timeout_s": 5}, "detector": {"min_face_size": 40, "min_face_score": 0.8}})
    assert cfg.model_location == "/m.pt" and cfg.limits.timeout_s == 5 and cfg.detector.min_face_size == 40
    assert cfg.detector.min_face_score == 0.8
    assert build(ServeConfig, {"model": "s3://b/m.pt"}).model_location == "s3://b/m.pt"
    with pytest.raises(UserError, match="limits must be positive"):
        build(ServeConfig, {"limits": {"timeout_s": 0}})


def test_image_failures_map_to_http_statuses():
    assert failure_status("too_large") == 413 and failure_status("inference_error") == 500
    assert {failure_status(code) for code in ("empty", "undecodable", "read_error")} == {400}


def test_max_faces_is_a_whole_number_of_at_least_one_capped_by_the_limit():
    assert parse_max_faces(None, 100) == 100 and parse_max_faces("", 100) == 100
    assert parse_max_faces("3", 100) == 3 and parse_max_faces(3, 100) == 3 and parse_max_faces(500, 100) == 100
    for bad in (0, "-1", "two", 2.5, "2.5"):
        with pytest.raises(ApiError) as caught:
            parse_max_faces(bad, 100)
        assert caught.value.status == 400 and caught.value.code == "bad_request"


def test_the_web_page_ships_in_the_package_and_loads_nothing_from_elsewhere():
    page = web_page()
    assert "<script>" in page and 'id="file"' in page and "/v1/age" in page
    assert "http://" not in page and "https://" not in page and "<link" not in page


def test_the_request_log_gives_each_answer_once_and_the_terminal_one_line_per_busy_interval():
    log = RequestLog(keep=3)
    assert traffic_line(log.since(0), 10) is None  # a quiet interval prints nothing
    for status, ms in ((200, 100.0), (200, 300.0), (400, 5.0), (200, 200.0)):
        log.record(status, ms)
    first = log.since(0)
    assert (first["answered"], first["errors"]) == (4, 1)
    assert first["recent"] == [[200, 300.0], [400, 5.0], [200, 200.0]]  # the last `keep` answers only
    assert log.since(3)["recent"] == [[200, 200.0]] and log.since(4)["recent"] == []
    assert traffic_line(first, 10) == ("c3ae serve: 3 requests in the last 10 s (1 failed), p50 200 ms, p99 300 ms; "
                                       "4 since the start (1 failed)")
    with pytest.raises(UserError, match="log_level must be one of"):
        build(ServeConfig, {"log_level": "LOUD"})


def test_haproxy_left_running_by_a_served_node_is_stopped_and_no_other(tmp_path):
    """`c3ae serve` ends by killing its node's HAProxy when Serve's shutdown left it running (bound to the port)."""
    import os
    import subprocess
    import time

    from c3ae_ray.serving import stop_orphaned_haproxy

    haproxy = tmp_path / "haproxy"
    haproxy.symlink_to("/bin/sh")  # a process whose command is `.../haproxy ... /tmp/haproxy-serve/<node>/haproxy.cfg`
    ours, other = (subprocess.Popen([str(haproxy), "-c", "sleep 60; :", f"/tmp/haproxy-serve/{node}/haproxy.cfg"])
                   for node in ("node-ours", "node-other"))
    try:
        time.sleep(0.3)
        assert stop_orphaned_haproxy("node-ours") == [ours.pid]
        assert ours.wait(timeout=10) == -9 and other.poll() is None
        assert stop_orphaned_haproxy("node-gone") == [] and os.path.exists(f"/proc/{other.pid}")
    finally:
        for process in (ours, other):
            process.kill()
            process.wait()
