"""The inference path and scoring without Ray: listing an image store, reading files, one image -> its faces'
outputs (the same as the model on the reference crops) -> rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from c3ae_ray.batch import decoded_inputs, filesystems_for, progress_line, read_files
from c3ae_ray.config import UserError
from c3ae_ray.images import decode_image
from c3ae_ray.inference import Estimator, ImageFailure
from c3ae_ray.model import load_model, model_identity
from c3ae_ray.score import SCHEMA, answer_rows, list_images
from tests.bad_files import write_bad_files
from tests.oracles import crops_to_tensor, face_crops


@pytest.fixture(scope="module")
def estimator(model_file):
    torch.set_num_threads(1)
    return Estimator(model_file, device="cpu")


def rows_of(records: list[dict], estimator: Estimator) -> list[dict]:
    """What the scoring actor does with a batch of read rows."""
    answers = estimator.estimate(decoded_inputs(records, 64_000_000))
    return [row for record, answer in zip(records, answers) for row in answer_rows(record["path"], answer, ("test", "7"))]


def test_folder_listing_is_recursive_sorted_and_images_only(tmp_path):
    for name in ("b.jpg", "a.PNG", "sub/c.jpeg", "sub/deeper/d.webp", "notes.txt", ".hidden.jpg", "sub/labels.csv"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    images = list_images(str(tmp_path))
    assert images == [str(tmp_path / n) for n in ("a.PNG", "b.jpg", "sub/c.jpeg", "sub/deeper/d.webp")]
    assert list(filesystems_for(images)) == [""]


def test_single_image_and_file_list(tmp_path):
    (tmp_path / "one.jpg").write_bytes(b"x")
    assert list_images(str(tmp_path / "one.jpg")) == [str(tmp_path / "one.jpg")]
    listing = tmp_path / "lists" / "images.txt"
    listing.parent.mkdir()
    listing.write_text(f"# a comment\n../one.jpg\n\n  {tmp_path}/missing.jpg  \nrelative/two.png\n")
    images = list_images(str(listing))
    # entries are taken as listed (a missing one becomes an error row later), relative to the list's folder
    assert images == sorted([f"{tmp_path}/lists/../one.jpg", f"{tmp_path}/missing.jpg", f"{tmp_path}/lists/relative/two.png"])


def test_listing_errors_are_clear(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        list_images(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        list_images(str(tmp_path / "empty"))
    (tmp_path / "blank.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="names no images"):
        list_images(str(tmp_path / "blank.txt"))
    (tmp_path / "binary.dat").write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match="neither an image nor"):
        list_images(str(tmp_path / "binary.dat"))


def test_read_files_turns_unreadable_files_into_errors_and_skips_rows_in_error(tmp_path):
    (tmp_path / "ok.jpg").write_bytes(b"bytes")
    (tmp_path / "folder.jpg").mkdir()
    paths = [str(tmp_path / n) for n in ("ok.jpg", "missing.jpg", "folder.jpg", "ok.jpg")]
    given = pa.table({"path": paths, "age": [1.0, 2.0, 3.0, 200.0], "error": [None, None, None, "bad_age: 200.0"]})
    read = read_files(given, filesystems_for(paths)).to_pylist()
    assert read[0] == {"path": paths[0], "age": 1.0, "data": b"bytes", "error": None}
    for row in read[1:3]:
        assert row["data"] is None and row["error"].startswith("read_error: ")
    assert read[3] == {"path": paths[3], "age": 200.0, "data": None, "error": "bad_age: 200.0"}  # never read
    inputs = decoded_inputs(read)
    assert inputs[0] == ImageFailure("undecodable", inputs[0].message) and inputs[3] == ImageFailure("bad_age", "200.0")


def test_each_face_gets_the_model_output_on_the_shared_crop_geometry(estimator, model_file, shared_data):
    image = decode_image((shared_data / "faces" / "multiface.jpg").read_bytes())
    (result,) = estimator.estimate([image])
    assert result.n_faces == len(result.faces) == 6
    scores = [face.score for face in result.faces]
    assert scores == sorted(scores, reverse=True) and min(scores) >= 0.9
    model, _ = load_model(model_file)
    crops = np.stack([face_crops(image, face.box, estimator.age_model.crop) for face in result.faces])
    with torch.inference_mode():
        prediction = model(crops_to_tensor(crops))
        ages, distributions, p_female = prediction.age, prediction.distribution, prediction.p_female()
    # the scorer cuts with the batched training crops (no uint8 rounding): equal to well under a year
    np.testing.assert_allclose([f.age for f in result.faces], ages.clamp_min(0).numpy(), atol=0.05)
    np.testing.assert_allclose(np.stack([f.distribution for f in result.faces]), distributions.numpy(), atol=2e-3)
    np.testing.assert_allclose([f.p_female for f in result.faces], p_female.numpy(), atol=2e-3)
    assert [f.gender for f in result.faces] == ["female" if f.p_female >= 0.5 else "male" for f in result.faces]
    assert all(f.landmarks.shape == (5, 2) for f in result.faces)


def test_max_faces_keeps_the_most_confident_and_counts_all(model_file, shared_data):
    image = decode_image((shared_data / "faces" / "multiface.jpg").read_bytes())
    capped = Estimator(model_file, device="cpu", max_faces=2).estimate([image])[0]
    full = Estimator(model_file, device="cpu").estimate([image])[0]
    assert capped.n_faces == 6 and len(capped.faces) == 2
    assert [f.age for f in capped.faces] == pytest.approx([f.age for f in full.faces[:2]], abs=1e-4)


def test_rows_for_faces_no_face_and_bad_files(estimator, shared_data, tmp_path):
    faces = shared_data / "faces"
    reasons = write_bad_files(tmp_path, (faces / "ivan.jpg").read_bytes())
    records = [{"path": name, "data": (tmp_path / name).read_bytes(), "error": None} for name in reasons]
    records += [{"path": n, "data": (faces / n).read_bytes(), "error": None} for n in ("multiface.jpg", "no-faces.jpg", "ivan.jpg")]
    records.append({"path": "gone.jpg", "data": None, "error": "read_error: FileNotFoundError: gone"})
    rows = rows_of(records, estimator)
    by_path: dict[str, list[dict]] = {}
    for row in rows:
        by_path.setdefault(row["path"], []).append(row)
    assert set(by_path) == {r["path"] for r in records}
    for name, reason in reasons.items():
        (row,) = by_path[name]
        assert row["status"] == "error" and row["reason"].split(":")[0] == reason and row["age"] is None
    assert by_path["gone.jpg"][0]["reason"].startswith("read_error")
    (no_face,) = by_path["no-faces.jpg"]
    assert no_face["status"] == "no_face" and no_face["n_faces"] == 0 and no_face["image_width"] == 199
    group = by_path["multiface.jpg"]
    assert [r["face_index"] for r in group] == list(range(6)) and {r["n_faces"] for r in group} == {6}
    (single,) = by_path["ivan.jpg"]
    assert single["status"] == "face" and len(single["box"]) == 4 and len(single["landmarks"]) == 10
    assert len(single["distribution"]) == 12 and sum(single["distribution"]) == pytest.approx(1, abs=1e-4)
    assert single["age"] >= 0 and single["face_score"] >= 0.9
    assert single["age_low"] is None and single["age_high"] is None  # this model file has no age range
    assert single["gender"] == ("female" if single["p_female"] >= 0.5 else "male") and 0 < single["p_female"] < 1
    assert all(set(row) == set(SCHEMA.names) for row in rows) and "ethnicity" not in SCHEMA.names  # a training aid only
    assert {(r["model_name"], r["model_version"]) for r in rows} == {("test", "7")}


def test_model_identity_names_the_exact_weights(model_file):
    data = model_file.read_bytes()
    _, payload = load_model(data)
    name, version = model_identity(payload, model_file)
    assert name == "seed0" and len(version) == 12 and payload["sha256"].startswith(version)
    assert model_identity({**payload, "meta": {"name": "c3ae-utkface", "version": "1.0"}}, model_file) == ("c3ae-utkface", "1.0")
    with pytest.raises(FileNotFoundError):
        load_model(model_file.parent / "absent.pt")


def test_a_progress_line_says_how_far_how_fast_and_how_long_is_left():
    assert progress_line("preprocess", 3_200, 21_692, 40.0) == \
        "preprocess: 3,200 of 21,692 images (15%), 80.0 images/s, about 4 min left"
    assert progress_line("score", 90, 100, 9.0) == "score: 90 of 100 images (90%), 10.0 images/s, about 1 s left"
    assert progress_line("score", 0, 100, 5.0) == "score: 0 of 100 images (0%), 0.0 images/s"
    assert progress_line("score", 120, 100, 10.0).startswith("score: 100 of 100 images (100%)")  # a retried batch counts twice
