"""`c3ae predict` as a user types it, with the bundled model: one line per face with its age range, per-file
errors, JSON, annotated copies, and exit 1 only when nothing could be read; with a gender head its gender too; an
ensemble file like any other."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2

from c3ae_ray import model
from tests import fixtures, hostile

C3AE = str(Path(sys.executable).with_name("c3ae"))


def predict(*args):
    return subprocess.run([C3AE, "predict", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_one_photo_prints_one_face_with_an_age(shared_data):
    result = predict(shared_data / "faces" / "ivan.jpg")
    assert result.returncode == 0, result.stderr
    faces = re.findall(r"^  face (\d+): age ([\d.]+) \((\d+)-(\d+)\)  (female|male) \(p_female [\d.]+\)  box \[(\d+), (\d+), (\d+), (\d+)\]",
                       result.stdout, re.M)
    assert len(faces) == 1 and 1 <= float(faces[0][1]) <= 100 and faces[0][4] == "male"  # the bundled model has a gender head
    low, high = int(faces[0][2]), int(faces[0][3])  # its calibrated 80% range, whole years
    assert low <= round(float(faces[0][1])) <= high and 3 <= high - low <= 60
    assert result.stdout.splitlines()[-2:] == ["1 file(s): 1 read, 1 face(s), 0 unreadable",
                                               "in brackets: the range that held 80% of true ages on faces the model never trained on"]


def test_mixed_files_are_reported_each_and_drawn(shared_data, tmp_path):
    faces = shared_data / "faces"
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    draw = tmp_path / "drawn"
    result = predict(faces / "multiface.jpg", faces / "no-faces.jpg", broken, tmp_path / "absent.jpg", "--json", "--draw", draw)
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout)
    assert [r["path"] for r in results] == [str(faces / "multiface.jpg"), str(faces / "no-faces.jpg"), str(broken), str(tmp_path / "absent.jpg")]
    group, empty, bad, absent = results
    assert len(group["faces"]) == group["n_faces"] >= 5 and all(0 < f["age"] < 111 for f in group["faces"])
    assert empty["faces"] == [] and empty["error"] is None
    assert bad["error"].startswith("undecodable") and absent["error"].startswith("read_error")
    drawn = cv2.imread(group["drawn"])
    original = cv2.imread(str(faces / "multiface.jpg"))
    assert drawn.shape == original.shape and (abs(drawn.astype(int) - original).sum(axis=2) > 60).mean() > 0.001
    assert sorted(p.name for p in draw.iterdir()) == ["multiface.jpg", "no-faces.jpg"]


def test_a_model_with_a_gender_head_answers_gender_in_text_and_json(shared_data, model_file, tmp_path):
    photo = shared_data / "faces" / "ivan.jpg"
    text = predict(photo, "--model", model_file)
    assert text.returncode == 0, text.stderr
    assert re.search(r"^  face 1: age [\d.]+  (female|male) \(p_female 0\.\d\d\)  box ", text.stdout, re.M), text.stdout
    [result] = json.loads(predict(photo, "--model", model_file, "--json").stdout)
    [face] = result["faces"]
    assert face["gender"] == ("female" if face["p_female"] >= 0.5 else "male") and "ethnicity" not in face
    [bundled] = json.loads(predict(photo, "--json").stdout)
    assert bundled["faces"][0]["gender"] == "male"  # the bundled model has the head too; ivan.jpg is a man
    assert bundled["age_range_coverage"] == 0.8 and bundled["faces"][0]["age_low"] < bundled["faces"][0]["age"] < bundled["faces"][0]["age_high"]
    assert result["age_range_coverage"] is None and face["age_low"] is None and face["age_high"] is None  # a file without a range
    assert "in brackets" not in text.stdout
    model.save_model(model.C3AE(), tmp_path / "age-only.pt")  # a model without the head answers null
    [age_only] = json.loads(predict(photo, "--model", tmp_path / "age-only.pt", "--json").stdout)
    assert age_only["faces"][0]["gender"] is None and age_only["faces"][0]["p_female"] is None


def test_an_ensemble_model_file_answers_like_one_model(shared_data, ensemble_file):
    photo = shared_data / "faces" / "ivan.jpg"
    result = predict(photo, "--model", ensemble_file, "--json")
    assert result.returncode == 0, result.stderr
    [answer] = json.loads(result.stdout)
    [face] = answer["faces"]  # three untrained members' mean: any age, with its range and a gender
    assert face["age_low"] < face["age"] < face["age_high"] and answer["age_range_coverage"] == 0.8
    assert face["gender"] == ("female" if face["p_female"] >= 0.5 else "male") and "ethnicity" not in face


def test_a_video_gives_one_result_per_sampled_frame_with_its_time(shared_data, tmp_path):
    faces = shared_data / "faces"
    clip = fixtures.make_clip(tmp_path / "clip.mp4", [faces / "ivan.jpg", faces / "no-faces.jpg"])  # 1.5 s each
    broken = tmp_path / "broken.mov"
    broken.write_bytes(clip.read_bytes()[:5000])
    result = predict(clip, broken, faces / "ivan.jpg", "--json", "--draw", tmp_path / "drawn")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no OpenCV or FFmpeg chatter for the broken file
    frames, [bad, photo] = (results := json.loads(result.stdout))[:3], results[3:]
    assert [(r["path"], r["time_s"], len(r["faces"])) for r in frames] == [(str(clip), 0, 1), (str(clip), 1, 1), (str(clip), 2, 0)]
    assert bad["path"] == str(broken) and bad["time_s"] is None and bad["error"].startswith("undecodable")
    assert photo["time_s"] is None and len(photo["faces"]) == 1
    video_age, photo_age = frames[0]["faces"][0]["age"], photo["faces"][0]["age"]
    assert abs(video_age - photo_age) < 5  # the same face, resized and re-encoded
    assert sorted(p.name for p in (tmp_path / "drawn").iterdir()) == ["clip-0s.jpg", "clip-1s.jpg", "clip-2s.jpg", "ivan.jpg"]
    text = predict(clip, "--fps", "2")
    assert text.returncode == 0, text.stderr
    assert [line.split(":")[0] for line in text.stdout.splitlines() if line.startswith(str(clip))] == \
        [f"{clip} at {t:g} s" for t in (0, 0.5, 1, 1.5, 2, 2.5)]
    assert "1 file(s): 1 read, 3 face(s) in 6 video frame(s) and 0 photo(s), 0 unreadable" in text.stdout
    refused = predict(clip, "--fps", "0")
    assert refused.returncode == 1 and "fps must be positive" in refused.stderr and "Traceback" not in refused.stderr


def test_nothing_readable_is_exit_1(tmp_path):
    result = predict(tmp_path / "absent.jpg", tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "none of the 2 file(s) could be read" in result.stderr
    assert f"{tmp_path}: error: read_error" in result.stdout


def test_predict_score_and_serve_default_to_the_bundled_model():
    for command in ("predict", "score", "serve"):
        shown = subprocess.run([C3AE, command, "--help"], capture_output=True, text=True, timeout=60).stdout
        assert "bundled model" in " ".join(shown.split()), command


def test_a_folder_of_generated_hostile_files_gets_one_result_or_error_each(shared_data, tmp_path):
    """Every format intact and broken (tests/hostile.py), with a real photo among them: never a crashed run."""
    folder = tmp_path / "hostile"
    written = hostile.hostile_folder(folder, 48)
    shutil.copyfile(shared_data / "faces" / "ivan.jpg", folder / "ivan.jpg")
    result = predict(*sorted(folder.iterdir()), "--json", "--draw", tmp_path / "drawn")  # as `c3ae predict hostile/*`
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    results = {Path(r["path"]).name: r for r in json.loads(result.stdout)}
    assert set(results) == {path.name for path in written} | {"ivan.jpg"}  # the folder's files, each once
    assert results["ivan.jpg"]["n_faces"] == 1
    for name, answer in results.items():
        assert answer["error"] is None or answer["error"].split(":")[0] in hostile.READER_REASONS, (name, answer["error"])
    errors = sum(r["error"] is not None for r in results.values())
    assert 0 < errors < len(results)
