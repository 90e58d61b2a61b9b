"""`train` on the session's local Ray: a complete run folder (faces held in memory), two streaming workers
onto S3, a killed worker that resumes from its latest checkpoint, fine-tuning from a model file, an ensemble
of members with gender and ethnicity heads and its card's fairness tables, the age range calibrated at the
end of a run, and preprocess -> pretrain -> fine-tune on the real wiki.mat."""

from __future__ import annotations

import csv
import io
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from c3ae_ray import storage
from c3ae_ray.model import MODEL_FORMAT, Ensemble, load_model
from c3ae_ray.config import UserError, build
from c3ae_ray.faces import open_faces, read_faces
from c3ae_ray.inference import predict_stored
from c3ae_ray.card import write_card
from c3ae_ray.datasets import read_dataset
from c3ae_ray.preprocess import PreprocessConfig, preprocess
from c3ae_ray.train import TrainConfig, train
from tests import fixtures


def run(data, out, **flags):
    return train(build(TrainConfig, {"data": str(data), "out": str(out), **flags}))


@pytest.fixture(scope="module")
def one_worker_run(face_parquet, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "run"
    return out, run(face_parquet, out, epochs=2, seed=1)


def test_one_worker_writes_metrics_plots_checkpoints_and_a_small_model(one_worker_run, face_parquet):
    out, summary = one_worker_run
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoints", "config.json", "curves.png", "metrics.csv", "metrics.json", "model.pt", "summary.json"
    ]
    rows = list(csv.DictReader(io.StringIO((out / "metrics.csv").read_text())))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for column in ("train_loss", "train_kl", "train_l1", "val_loss", "val_kl", "val_mae", "val_ca3", "val_ca5",
                   "val_ca7", "lr", "samples_per_s"):
        assert all(float(r[column]) >= 0 for r in rows), column
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "checkpoints" / "epoch_002" / "state.pt").is_file()
    data = summary["data"]
    assert data["train"]["faces"] + data["val"]["faces"] == storage.read_json(*storage.resolve(str(face_parquet / "summary.json")))["kept"]
    assert all(int(r["train_samples"]) == data["train"]["faces"] for r in rows)

    assert (out / "model.pt").stat().st_size < 300_000
    payload = torch.load(out / "model.pt", weights_only=True)
    assert payload["format"] == MODEL_FORMAT and payload["crop_config"]["scales"] == [1.0, 1.5, 2.0]
    model, payload = load_model(out / "model.pt")
    best = min(rows, key=lambda r: float(r["val_mae"]))
    assert payload["meta"]["best_epoch"] == summary["best_epoch"] == int(best["epoch"])
    assert payload["meta"]["val_mae"] == pytest.approx(float(best["val_mae"]), abs=1e-3)
    assert payload["meta"]["data"]["train"]["faces"] == data["train"]["faces"]
    assert payload["meta"]["train_config"]["epochs"] == 2 and model.cfg.se
    assert "age_range" not in payload and summary["age_range"] is None  # 4 validation faces: too few to calibrate on


@pytest.mark.slow
def test_a_run_calibrates_its_age_range_on_its_validation_faces(face_parquet, utkface_val_parquet, tmp_path):
    """Validated on a separate output (the held-out shared UTKFace faces, about 760), the run fits its range on
    one hash half of those faces and checks it on the other, and the file answers with it."""
    # Those faces' names all hash into the bottom tenth (that is how they were held out): under other names,
    # the halves of a separate output (hash above or below 0.5) are both about half of them.
    val = tmp_path / "val-faces"
    (val / "faces").mkdir(parents=True)
    shutil.copyfile(utkface_val_parquet / "summary.json", val / "summary.json")
    faces = pq.read_table(utkface_val_parquet / "faces")
    renamed = pa.array([f"{path}.renamed.jpg" for path in faces.column("path").to_pylist()])
    pq.write_table(faces.set_column(faces.column_names.index("path"), "path", renamed), val / "faces" / "part-0.parquet")
    summary = run(face_parquet, tmp_path / "run", epochs=1, val_data=str(val))
    fitted = summary["age_range"]["age_range"]
    assert fitted["coverage"] == 0.8 and fitted["faces"] + fitted["check_faces"] == summary["data"]["val"]["faces"]
    # One epoch on 40 faces: a model that takes most faces for older than they are, so the range must reach far
    # below the age and not above it. On the other half it holds about what was stated: within three standard
    # errors of a difference between two random halves of this size (about 0.09 here).
    assert fitted["check_coverage"] >= 0.8 - 3 * (2 * 0.8 * 0.2 / fitted["check_faces"]) ** 0.5, fitted
    _, payload = load_model(tmp_path / "run" / "model.pt")
    assert payload["age_range"] == fitted


def test_two_streaming_workers_split_the_data_and_write_the_run_to_s3(face_parquet, s3_server):
    """The streamed path (decoded every epoch, random block order, local shuffle buffer) on two workers;
    the other tests take the default, each worker's faces held in memory."""
    summary = run(face_parquet, "s3://c3ae-test/runs/two", epochs=1, workers=2, data_cache="stream")
    assert summary["workers"] == 2 and summary["config"]["data_cache"] == "stream"
    fs, path = storage.resolve("s3://c3ae-test/runs/two")
    names = {info.base_name for info in fs.get_file_info(pafs.FileSelector(path))}
    assert {"model.pt", "metrics.csv", "curves.png", "summary.json", "config.json", "checkpoints"} <= names
    history = storage.read_json(fs, f"{path}/metrics.json")
    faces = summary["data"]["train"]["faces"]
    assert faces - 1 <= history[0]["train_samples"] <= faces  # equal shards: at most one row dropped
    with fs.open_input_file(f"{path}/model.pt") as stream:
        model, payload = load_model(io.BytesIO(stream.read()))
    assert payload["meta"]["train_config"]["workers"] == 2


def test_a_killed_worker_is_restarted_from_the_latest_checkpoint(ray_session, face_parquet, tmp_path):
    out = tmp_path / "run"
    outcome = {}
    # An epoch from memory, with its checkpoint, takes about 2 s here: enough of them that the kill lands mid-run.
    epochs = 10
    thread = threading.Thread(target=lambda: outcome.update(summary=run(face_parquet, out, epochs=epochs, seed=2)))
    thread.start()
    deadline = time.time() + 300
    while not (out / "checkpoints" / "epoch_002").is_dir():
        assert thread.is_alive() and time.time() < deadline, "the run ended or stalled before its second checkpoint"
        time.sleep(0.2)
    # Train V2's controller collects reported checkpoints every 2 s: a worker killed sooner after a report
    # restarts from the checkpoint before it. Wait until the controller has seen one past epoch 1.
    time.sleep(5)
    assert thread.is_alive(), "the run ended before the kill"
    assert fixtures.kill_ray_process(ray_session, "ray::RayTrainWorker"), "no RayTrainWorker process found"
    thread.join(timeout=400)
    assert "summary" in outcome, "training did not finish after the worker was killed"
    history = storage.read_json(*storage.resolve(str(out / "metrics.json")))
    assert [r["epoch"] for r in history] == list(range(1, epochs + 1))  # none lost, none repeated
    first = [r["epoch"] for r in history if r["attempt"] == 1]
    second = [r["epoch"] for r in history if r["attempt"] == 2]
    # The restart goes on after the last checkpoint the controller registered, not from epoch 1.
    assert first[:2] == [1, 2] and second, f"epochs by attempt: {first} then {second}"
    assert second == list(range(first[-1] + 1, epochs + 1))
    assert outcome["summary"]["attempts"] == 2


def test_fine_tuning_starts_from_the_given_model(one_worker_run, face_parquet, tmp_path):
    source, _ = one_worker_run
    summary = run(face_parquet, tmp_path / "tuned", epochs=1, init_from=str(source / "model.pt"), lr=1e-4)
    model, payload = load_model(tmp_path / "tuned" / "model.pt")
    assert payload["meta"]["init_from"]["path"] == str(source / "model.pt")
    assert summary["config"]["init_from"] == str(source / "model.pt")
    start, _ = load_model(source / "model.pt")
    # A few Adam steps at lr 1e-4 move each weight by about 1e-4 per step: the weights came from the source
    # model (a fresh initialisation would be ~0.1 away) and they did train.
    drift = (model.trunk.features[0][0].weight - start.trunk.features[0][0].weight).abs().max().item()
    assert 0 < drift < 5e-3
    # the card names the source and what its file recorded then (the source file may be replaced later)
    source_meta = load_model(source / "model.pt")[1]["meta"]
    write_card(str(tmp_path / "tuned" / "model.pt"), str(tmp_path / "card"))
    card = (tmp_path / "card" / "MODEL_CARD.md").read_text()
    assert (f"fine-tuned from `{source / 'model.pt'}` (then: {source_meta['data']['train']['faces']:,} training faces, "
            f"best epoch {source_meta['best_epoch']}, validation MAE {source_meta['val_mae']:.2f})") in card


def test_an_ensemble_with_gender_and_ethnicity_heads_trains_its_members_by_seed_into_one_file_and_card(face_parquet, tmp_path, capsys):
    """Also the heads: each member reports its gender accuracy and both heads' losses, and the ensemble's card has
    the fairness tables."""
    out = tmp_path / "ensemble"
    # half the faces held out: the average over members is then measured on ~20 faces, not 4, and the card's
    # groups have faces each
    flags = dict(epochs=2, seed=1, members=2, val_fraction=0.5, model={"gender_head": True, "ethnicity_head": True})
    summary = run(face_parquet, out, **flags)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "member_1", "member_2", "model.pt", "summary.json"]
    member_files = [out / f"member_{k}" / "model.pt" for k in (1, 2)]
    members = [load_model(path) for path in member_files]
    assert [payload["meta"]["train_config"]["seed"] for _, payload in members] == [1, 2]
    assert [m["val_mae"] for m in summary["members"]] == [payload["meta"]["val_mae"] for _, payload in members]
    history = storage.read_json(*storage.resolve(str(out / "member_1" / "metrics.json")))
    assert 0 <= history[0]["val_gender_acc"] <= 1 and history[0]["train_gender"] > 0 and history[0]["train_ethnicity"] > 0
    best = next(record for record in history if record["epoch"] == summary["members"][0]["best_epoch"])
    assert members[0][1]["meta"]["val_gender_acc"] == pytest.approx(best["val_gender_acc"], abs=1e-4)

    ensemble, payload = load_model(out / "model.pt")
    assert isinstance(ensemble, Ensemble) and payload["members"] == 2 and payload["meta"]["val_mae"] == summary["val_mae"]
    for slot, (member, _) in zip(ensemble.members, members):
        assert all(torch.equal(a, b) for a, b in zip(slot.state_dict().values(), member.state_dict().values()))
    assert not torch.equal(members[0][0].w1.weight, members[1][0].w1.weight)  # another seed, another model

    data = open_faces(str(face_parquet))
    faces, held_out = read_faces(data), data.held_out(0.5)
    each = [predict_stored(member, data, faces, held_out) for member, _ in members]
    true = faces["age"][held_out]
    # the stored-region path measures a member as its run's own validation did, and the file averages the members
    for outputs, (_, member_payload) in zip(each, members):
        assert np.abs(outputs.age - true).mean() == pytest.approx(member_payload["meta"]["val_mae"], abs=1e-3)
    averaged = np.mean([outputs.age for outputs in each], axis=0)
    assert summary["val_mae"] == pytest.approx(np.abs(averaged - true).mean(), abs=1e-3)
    genders = np.asarray(faces["gender"], dtype=object)[held_out]
    known = genders != None  # noqa: E711 (an object array)
    p_female = np.mean([outputs.p_female for outputs in each], axis=0)
    assert summary["val_gender_acc"] == pytest.approx(((p_female[known] >= 0.5) == (genders[known] == "female")).mean(), abs=1e-3)
    assert "ensemble of 2: val MAE" in capsys.readouterr().out
    measured = write_card(str(out / "model.pt"), str(tmp_path / "card"))
    card = (tmp_path / "card" / "MODEL_CARD.md").read_text()
    assert measured["mae"] == pytest.approx(summary["val_mae"], abs=1e-3) and "An ensemble of 2 such models" in card
    assert f"each member's best epoch kept ({', '.join(str(m['best_epoch']) for m in summary['members'])})" in card
    assert measured["gender_head"] and measured["gender_acc"] == pytest.approx(summary["val_gender_acc"], abs=1e-3)
    assert f"gender accuracy ({measured['gender_faces']:,} faces with a known gender) | **{measured['gender_acc']:.3f}**" in card
    assert "| ethnicity (the dataset's label) | faces | MAE | CA(5) | gender accuracy |" in card
    assert sum(row["faces"] for row in measured["by_ethnicity"]) == measured["faces"]
    assert "| gender (the dataset's label) |" in card and "| source folder |" in card  # fixture: root and part2/

    with pytest.raises(storage.OutputExistsError):
        run(face_parquet, out, **flags)
    # the ensemble's own outputs lost (a run stopped after its members): the rerun keeps both members
    written = [path.stat().st_mtime_ns for path in member_files]
    (out / "summary.json").unlink()
    (out / "model.pt").unlink()
    again = run(face_parquet, out, **flags)
    assert "member 1/2: finished before" in capsys.readouterr().out
    assert [path.stat().st_mtime_ns for path in member_files] == written and again["val_mae"] == summary["val_mae"]
    with pytest.raises(UserError, match="--init-from does not apply"):
        run(face_parquet, tmp_path / "tuned", members=2, init_from=str(member_files[0]))
    with pytest.raises(UserError, match="is an ensemble of 2 models: fine-tune from one of them"):
        run(face_parquet, tmp_path / "tuned", init_from=str(out / "model.pt"))


def test_preprocess_pretrain_and_fine_tune_on_the_real_wiki_metadata(ray_session, shared_data, face_parquet, tmp_path):
    """A `wiki_crop` at the real wiki.mat's own paths (shared faces placed at its first kept entries) through
    preprocess -> pretraining -> fine-tuning on UTKFace with a gender head added."""
    crop = tmp_path / "wiki_crop"
    crop.mkdir()
    (crop / "wiki.mat").symlink_to(shared_data / "imdb-wiki" / "wiki.mat")
    chosen = read_dataset("wiki", crop).records[:24]
    for record, face in zip(chosen, fixtures.utk_faces(shared_data / "utkface", 24, max_age=90)):
        Path(record["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(face, record["path"])
    summary = preprocess(PreprocessConfig(dataset="wiki", root=str(crop), out=str(tmp_path / "wiki-faces"), limit=24, detectors=2))
    assert summary["seen"] == 24 and summary["kept"] >= 16, summary
    rows = pq.read_table(tmp_path / "wiki-faces" / "faces", columns=["path", "age", "gender", "subject"]).to_pylist()
    by_path = {r["path"]: r for r in chosen}
    for row in rows:  # labels from the real .mat: DEX ages, its gender coding, the wiki id as subject
        record = by_path[row["path"]]
        assert (row["age"], row["gender"], row["subject"]) == (record["age"], record["gender"], record["subject"])
    pretrained = run(tmp_path / "wiki-faces", tmp_path / "pretrain", epochs=1, val_fraction=0.3)
    assert pretrained["data"]["train"]["faces"] + pretrained["data"]["val"]["faces"] == summary["kept"]
    tuned = run(face_parquet, tmp_path / "finetune", epochs=1, init_from=str(tmp_path / "pretrain" / "model.pt"),
                model={"gender_head": True})
    model, payload = load_model(tmp_path / "finetune" / "model.pt")
    assert payload["meta"]["init_from"]["path"] == str(tmp_path / "pretrain" / "model.pt") and model.cfg.gender_head
    assert 0 <= tuned["val_gender_acc"] <= 1