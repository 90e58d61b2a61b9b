"""`score` on the session's local Ray: a folder of good and bad images, reruns, and S3 in and out."""

from __future__ import annotations

import shutil
import subprocess
import time

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from c3ae_ray import storage
from c3ae_ray.datasets import IMAGE_EXTENSIONS
from c3ae_ray.batch import Tally, progress_lines
from c3ae_ray.score import ScoreConfig, score
from tests import fixtures, hostile
from tests.bad_files import write_bad_files


def run(input, out, model, **options) -> dict:
    options.setdefault("actors", 1)
    return score(ScoreConfig(input=str(input), out=str(out), model=str(model), **options))


@pytest.fixture(scope="module")
def image_store(shared_data, tmp_path_factory):
    """3 photos (6 faces, 1 face, none), 4 UTKFace faces in a subfolder, and the known bad files."""
    root = tmp_path_factory.mktemp("store")
    for name in ("multiface.jpg", "ivan.jpg", "no-faces.jpg"):
        shutil.copyfile(shared_data / "faces" / name, root / name)
    (root / "utk").mkdir()
    for face in fixtures.utk_faces(shared_data / "utkface", 4):
        shutil.copyfile(face, root / "utk" / face.name)
    reasons = write_bad_files(root / "bad", (shared_data / "faces" / "ivan.jpg").read_bytes())
    return root, reasons


def test_folder_rows_and_counts(ray_session, image_store, model_file, tmp_path):
    root, reasons = image_store
    summary = run(root, tmp_path / "out", model_file, batch_size=4)
    assert summary["images"] == summary["listed"] == 3 + 4 + len(reasons)
    assert summary["faces"] == 6 + 1 + 4 and summary["images_with_faces"] == 6
    assert summary["no_face"] == 1 and summary["errors"] == len(reasons)
    assert summary["error_reasons"] == {"empty": 1, "undecodable": 3, "too_large": 1}
    assert summary["model"]["name"] == "seed0" and len(summary["model"]["bins"]) == 12
    rows = pq.read_table(tmp_path / "out" / "predictions").to_pylist()
    assert storage.require_complete(str(tmp_path / "out"))[2]["faces"] == 11
    group = sorted((r for r in rows if r["path"].endswith("multiface.jpg")), key=lambda r: r["face_index"])
    assert [r["face_index"] for r in group] == list(range(6)) and all(r["status"] == "face" for r in group)
    for name, reason in reasons.items():
        (row,) = [r for r in rows if r["path"] == str(root / "bad" / name)]
        assert row["status"] == "error" and row["reason"].startswith(reason)


def test_rerun_refused_then_overwrite_without_duplicates(ray_session, image_store, model_file, tmp_path):
    root, _ = image_store
    out = tmp_path / "out"
    first = run(root / "utk", out, model_file)
    with pytest.raises(storage.OutputExistsError):
        run(root / "utk", out, model_file)
    again = run(root / "utk", out, model_file, overwrite=True, max_faces=1)
    assert first["faces"] == again["faces"] == 4
    assert pq.read_table(out / "predictions").num_rows == 4
    assert [p.name for p in out.iterdir()] and not list(tmp_path.glob("out.partial-*"))


def test_s3_input_and_output_on_a_loopback_server(ray_session, shared_data, model_file, s3_server):
    filesystem, _ = storage.resolve("s3://c3ae-test/photos")
    for name in ("multiface.jpg", "ivan.jpg", "no-faces.jpg"):
        with filesystem.open_output_stream(f"c3ae-test/photos/{name}") as stream:
            stream.write((shared_data / "faces" / name).read_bytes())
    with filesystem.open_output_stream("c3ae-test/photos/nested/corrupt.jpg") as stream:
        stream.write(b"\xff\xd8\xff\xe0 not really a jpeg")
    summary = run("s3://c3ae-test/photos", "s3://c3ae-test/scores/run1", model_file)
    assert (summary["images"], summary["faces"], summary["no_face"], summary["errors"]) == (4, 7, 1, 1)
    out_fs, path, written = storage.require_complete("s3://c3ae-test/scores/run1")
    assert written["faces"] == 7
    rows = pads.dataset(f"{path}/predictions", filesystem=out_fs, format="parquet").to_table().to_pylist()
    assert sorted({r["path"] for r in rows}) == [
        "s3://c3ae-test/photos/ivan.jpg", "s3://c3ae-test/photos/multiface.jpg",
        "s3://c3ae-test/photos/nested/corrupt.jpg", "s3://c3ae-test/photos/no-faces.jpg",
    ]
    (corrupt,) = [r for r in rows if r["path"].endswith("corrupt.jpg")]
    assert corrupt["status"] == "error" and corrupt["reason"].startswith("undecodable")


def test_a_store_with_videos_gets_a_row_per_face_per_sampled_frame(ray_session, shared_data, model_file, tmp_path):
    faces = shared_data / "faces"
    root = tmp_path / "store"
    root.mkdir()
    fixtures.make_clip(root / "clip.mp4", [faces / "ivan.jpg", faces / "no-faces.jpg"])  # 1.5 s each at 10 fps
    (root / "broken.webm").write_bytes(b"\x1aE\xdf\xa3 not a real webm")
    shutil.copyfile(faces / "ivan.jpg", root / "ivan.jpg")
    summary = run(root, tmp_path / "out", model_file, batch_size=2)
    assert summary["images"] == summary["listed"] == 3 and summary["videos"] == 1 and summary["video_frames"] == 3
    assert summary["faces"] == 2 + 1 and summary["no_face"] == 1 and summary["errors"] == 1
    assert summary["error_reasons"] == {"undecodable": 1}
    rows = pq.read_table(tmp_path / "out" / "predictions").to_pylist()
    clip = sorted((r for r in rows if r["path"].endswith("clip.mp4")), key=lambda r: r["time_s"])
    assert [(r["time_s"], r["status"]) for r in clip] == [(0, "face"), (1, "face"), (2, "no_face")]
    assert all(r["image_width"] == 320 and (r["age"] is None or r["age"] > 0) for r in clip)
    [photo] = [r for r in rows if r["path"].endswith("ivan.jpg")]
    [broken] = [r for r in rows if r["path"].endswith("broken.webm")]
    assert photo["time_s"] is None and photo["status"] == "face"
    assert broken["status"] == "error" and broken["reason"].startswith("undecodable") and broken["time_s"] is None


def test_progress_reporter_is_done_when_the_stage_is(ray_session, capsys):
    """The stage shuts Ray down right after the block; a reporter still inside `ray.get` then would end the
    process, so the block must not return while the reporter runs."""

    class SlowTally(Tally):  # defined here so that Ray ships it by value (workers cannot import tests)
        """A tally on a busy cluster: each read takes longer than the reporting interval."""

        def read(self) -> int:
            time.sleep(0.5)
            return super().read()

    tally = ray_session.remote(num_cpus=0)(SlowTally).remote()
    ray_session.get(tally.add.remote(3))
    with progress_lines("score", 10, tally, interval_s=0.05) as reporter:
        time.sleep(1.0)
    assert not reporter.is_alive()
    assert "score: 3 of 10 images (30%)" in capsys.readouterr().out


def test_a_killed_pool_actor_loses_and_repeats_no_row(ray_session, shared_data, model_file, tmp_path, capsys):
    """Ray Data restarts a killed pool actor and retries its batches: every image once in the output."""
    root = tmp_path / "store"
    root.mkdir()
    faces = fixtures.utk_faces(shared_data / "utkface", 160)
    for face in faces:
        shutil.copyfile(face, root / face.name)
    out = tmp_path / "out"
    summary = fixtures.kill_a_pool_actor_mid_run(
        ray_session, capsys, lambda: run(root, out, model_file, batch_size=4, max_faces=1, progress_s=0.2))
    rows = pq.read_table(out / "predictions").to_pylist()
    assert sorted(r["path"] for r in rows) == sorted(str(root / face.name) for face in faces)  # each once
    assert summary["images"] == summary["listed"] == len(faces) == len(rows)
    assert summary["faces"] + summary["no_face"] + summary["errors"] == len(faces) and summary["errors"] == 0
    assert storage.require_complete(str(out))[2] == summary


def test_a_folder_of_generated_hostile_files_gets_a_row_each(ray_session, shared_data, model_file, tmp_path):
    """Every format intact and broken (tests/hostile.py) beside a real photo: an error row or a result for each."""
    folder = tmp_path / "hostile"
    written = hostile.hostile_folder(folder, 60, seed=1)
    shutil.copyfile(shared_data / "faces" / "ivan.jpg", folder / "ivan.jpg")
    summary = run(folder, tmp_path / "out", model_file, batch_size=8, max_faces=1)
    rows = pq.read_table(tmp_path / "out" / "predictions").to_pylist()
    assert sorted(r["path"] for r in rows) == sorted(str(path) for path in [*written, folder / "ivan.jpg"] if path.suffix in IMAGE_EXTENSIONS)  # no .gif
    assert summary["images"] == len(rows) == summary["faces"] + summary["no_face"] + summary["errors"]
    assert 0 < summary["errors"] < len(rows) and set(summary["error_reasons"]) <= hostile.READER_REASONS
    assert [r["status"] for r in rows if r["path"].endswith("ivan.jpg")] == ["face"]


def test_a_full_then_read_only_disk_is_a_clear_error_and_a_rerun_succeeds(ray_session, shared_data, model_file, tmp_path):
    """A StorageError that names the output and the disk's own words; nothing at --out (no staging folder
    either); once the disk takes writes, the same run succeeds."""
    images = tmp_path / "images"
    images.mkdir()
    for face in fixtures.utk_faces(shared_data / "utkface", 12):
        shutil.copyfile(face, images / face.name)
    with fixtures.small_disk(tmp_path / "disk") as disk:
        filler = fixtures.fill(disk)
        with pytest.raises(storage.StorageError, match=rf"could not write {disk / 'out'}: .*No space left on device"):
            run(images, disk / "out", model_file)
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]
        filler.unlink()
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        with pytest.raises(storage.StorageError, match="Read-only file system"):
            run(images, disk / "out", model_file)
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
        assert list(disk.iterdir()) == []
        summary = run(images, disk / "out", model_file)
        assert summary["faces"] == 12 and storage.require_complete(str(disk / "out"))[2] == summary
