"""Training logic without Ray: the config from YAML and flags, the hash split, row decoding, run folders,
fine-tune checks, the loop's epoch and validation, the curves figure."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pyarrow as pa
import pytest
import torch

from c3ae_ray import loop, plots, storage, train
from c3ae_ray.augment import crop_batch
from c3ae_ray.cli import build_parser
from c3ae_ray.config import UserError, build, to_dict
from c3ae_ray.crops import CropConfig, cut_region
from c3ae_ray.faces import decode_faces, in_validation, split_key
from c3ae_ray.model import UNKNOWN, C3AE, ModelConfig, load_weights, save_model
from c3ae_ray.train import TrainConfig


def train_config(**values) -> TrainConfig:
    return build(TrainConfig, values)


def from_command_line(*argv: str) -> TrainConfig:
    args = build_parser().parse_args(["train", *argv])
    return args.stage.config(args)


def test_flags_override_the_yaml_which_overrides_the_paper_defaults(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("data: d\nepochs: 7\nbatch_size: 20\nlr: 0.001\nmodel:\n  dropout_head: 0.5\naugment:\n  p_flip: 0.0\n")
    cfg = from_command_line("--config", str(config), "--out", "o", "--lr", "0.01", "--no-se")
    assert (cfg.data, cfg.epochs, cfg.batch_size, cfg.lr) == ("d", 7, 20, 0.01)
    assert cfg.model == ModelConfig(se=False, dropout_head=0.5)
    assert cfg.augment.p_flip == 0.0 and cfg.augment.p_rotate == 0.5
    defaults = from_command_line("--data", "d", "--out", "o")
    assert (defaults.batch_size, defaults.weight_decay, defaults.alpha, defaults.learning_rate) == (50, 1e-4, 10.0, 0.005)
    assert from_command_line("--data", "d", "--out", "o", "--no-se").learning_rate == 0.002  # the plain model's
    assert from_command_line("--data", "d", "--out", "o", "--no-augment").augment is None
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "(default: 30)" in help_text and "(default: 0.1)" in help_text  # epochs and val_fraction from TrainConfig


def test_a_config_round_trips_through_json_and_bad_settings_are_named():
    cfg = train_config(data="d", out="o", model={"cascade": False}, epochs=3)
    assert build(TrainConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg
    with pytest.raises(UserError, match="unknown TrainConfig setting\\(s\\): epoch; allowed: data, out"):
        train_config(data="d", out="o", epoch=3)
    with pytest.raises(UserError, match="unknown TrainConfig.augment setting\\(s\\): p_flop"):
        train_config(data="d", out="o", augment={"p_flop": 1})
    with pytest.raises(UserError, match="--out is required"):
        from_command_line("--data", "d")
    with pytest.raises(UserError, match="TrainConfig.epochs: expected int, got 'ten'"):
        train_config(data="d", out="o", epochs="ten")
    with pytest.raises(UserError, match="val_fraction"):
        train_config(data="d", out="o", val_fraction=1.5)
    with pytest.raises(UserError, match="workers must be at least 1"):
        train_config(data="d", out="o", workers=0)
    with pytest.raises(UserError, match="lr_schedule must be one of plateau, cosine, got 'step'"):
        train_config(data="d", out="o", lr_schedule="step")
    with pytest.raises(UserError, match="augment.p_flip is a probability"):
        train_config(data="d", out="o", augment={"p_flip": 2})
    with pytest.raises(UserError, match="data_cache must be one of auto, memory, stream, got 'disk'"):
        train_config(data="d", out="o", data_cache="disk")
    with pytest.raises(UserError, match="gender_weight and ethnicity_weight must not be negative, got -1.0 and 1.0"):
        from_command_line("--data", "d", "--out", "o", "--gender-weight", "-1")
    assert from_command_line("--data", "d", "--out", "o", "--gender-weight", "5").gender_weight == 5.0


def test_auto_holds_a_workers_faces_in_memory_up_to_the_limit_and_streams_larger_shares():
    region_bytes = 3 * CropConfig().region_size ** 2
    fits = int(train.MEMORY_LIMIT_GIB * 2**30 / region_bytes)  # faces one worker may hold
    for faces, workers, cache, held in [(21_692, 1, "auto", True), (fits, 1, "auto", True), (fits + 1, 1, "auto", False),
                                        (2 * fits, 2, "auto", True), (400_000, 4, "auto", False),
                                        (400_000, 1, "memory", True), (100, 1, "stream", False)]:
        cfg = train_config(data="d", out="o", workers=workers, data_cache=cache)
        summary = {"train": {"faces": faces - faces // 10}, "val": {"faces": faces // 10}}
        share = train.shard_share_gib(cfg, FaceDataStub(CropConfig()), summary)
        assert share == pytest.approx(faces / workers * region_bytes / 2**30)
        assert train.in_memory(cfg, share) is held, (faces, workers, cache)
    assert from_command_line("--data", "d", "--out", "o", "--data-cache", "stream").data_cache == "stream"


class FaceDataStub:
    """What the size estimate reads of a FaceData: its crop geometry."""

    def __init__(self, crop):
        self.crop = crop


def test_batches_held_in_memory_cover_each_row_once_in_a_new_order_per_epoch():
    faces = {"region": torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 2, 2, 3),
             "boxes": torch.arange(10.0).view(10, 1, 1).expand(10, 3, 4), "age": torch.arange(10.0)}
    rows = torch.tensor([0, 2, 3, 5, 7, 8, 9])
    in_order = list(loop.batches_of(faces, rows, 3))
    assert [b["age"].tolist() for b in in_order] == [[0, 2, 3], [5, 7, 8], [9]]
    assert all(torch.equal(b["region"][:, 0, 0, 0].float(), b["age"]) and torch.equal(b["boxes"][:, 0, 0], b["age"]) for b in in_order)
    orders = []
    for seed in (1, 2, 1):
        epoch = list(loop.batches_of(faces, rows, 3, torch.Generator().manual_seed(seed)))
        assert [len(b["age"]) for b in epoch] == [3, 3, 1]
        orders.append(torch.cat([b["age"] for b in epoch]).tolist())
        assert sorted(orders[-1]) == rows.float().tolist()
    assert orders[0] == orders[2] != orders[1]  # an epoch's order depends on its seed alone


@pytest.mark.parametrize("schedule", ["plateau", "cosine"])
def test_the_learning_rate_schedules(schedule):
    """Plateau halves after `lr_patience` epochs without a lower monitored value; cosine falls to near 0 at the end."""
    cfg = TrainConfig(data="d", out="o", epochs=10, lr=0.004, lr_schedule=schedule, lr_patience=2)
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    scheduler = loop.lr_scheduler(optimizer, cfg)
    rates = []
    for epoch in range(cfg.epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # the epoch's steps come first, as in training
        loop.step_schedule(scheduler, 5.0)  # never better than the first epoch
    if schedule == "plateau":
        assert rates == [0.004] * 4 + [0.002] * 3 + [0.001] * 3
    else:
        assert rates[0] == 0.004 and all(a > b for a, b in zip(rates, rates[1:]))
        assert rates[5] == pytest.approx(0.002) and rates[-1] < 0.0001


def test_the_validation_split_is_deterministic_close_to_its_fraction_and_keeps_people_together():
    keys = [split_key(f"/data/{i}.jpg", None) for i in range(20000)]
    chosen = [in_validation(key, 0.1) for key in keys]
    assert chosen == [in_validation(key, 0.1) for key in keys]
    assert 0.09 < np.mean(chosen) < 0.11
    assert split_key("/a.jpg", "7") == split_key("/b.jpg", "7") != split_key("/a.jpg", None)
    assert split_key("/x/data/a.jpg", None) == split_key("s3://bucket/a.jpg", None)  # the same split on any machine
    assert all(in_validation(k, 0.2) for k in keys if in_validation(k, 0.1))  # a larger share only adds rows


def face_rows(n: int, crop: CropConfig = CropConfig()) -> tuple[pa.Table, np.ndarray]:
    """n preprocess-like face rows (regions JPEG-encoded as preprocess stores them) and the regions themselves."""
    ys, xs = np.mgrid[0:120, 0:100]
    rows, regions = [], []
    for i in range(n):  # smooth colour gradients (JPEG keeps them), a different one per row
        image = np.stack([xs * 2 + i, ys * 2, 255 - xs - ys + i], axis=-1).clip(0, 255).astype(np.uint8)
        region, boxes = cut_region(image, [30, 40, 70, 85], crop)
        ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(region, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 100])
        rows.append({"path": f"/d/{i}.jpg", "subject": None, "age": float(i), "region_jpeg": jpeg.tobytes(),
                     "region_boxes": boxes.reshape(-1).tolist()})
        regions.append(region)
    return pa.Table.from_pylist(rows), np.stack(regions)


def test_decoding_face_rows_gives_the_regions_and_boxes_and_respects_the_split():
    table, regions = face_rows(12)
    every = decode_faces(table, None, 0.0, CropConfig())
    assert every["region"].shape == (12, 154, 154, 3) and every["region"].dtype == np.uint8
    assert every["boxes"].shape == (12, 3, 4) and every["age"].tolist() == list(range(12))
    assert np.abs(every["region"].astype(int) - regions).mean() < 2  # JPEG at quality 100, RGB order kept
    val = decode_faces(table, "val", 0.5, CropConfig())
    fit = decode_faces(table, "train", 0.5, CropConfig())
    assert sorted(val["age"].tolist() + fit["age"].tolist()) == list(range(12))
    assert 0 < len(val["age"]) < 12
    empty = decode_faces(table.slice(0, 0), "train", 0.5, CropConfig())
    assert empty["region"].shape == (0, 154, 154, 3) and empty["boxes"].shape == (0, 3, 4)
    with pytest.raises(ValueError, match="not a 131px JPEG"):
        decode_faces(table, None, 0.0, CropConfig(scales=(1.0, 1.5, 1.7)))


def test_decoded_rows_carry_gender_and_ethnicity_codes_unknown_where_missing():
    """Outputs of older versions have no ethnicity column; missing labels become UNKNOWN (no loss)."""
    table, _ = face_rows(4)
    assert decode_faces(table, None, 0.0, CropConfig())["gender"].tolist() == [UNKNOWN] * 4
    labelled = table.append_column("gender", pa.array(["female", "male", None, "female"]))
    labelled = labelled.append_column("ethnicity", pa.array(["white", None, "other", "asian"]))
    decoded = decode_faces(labelled, None, 0.0, CropConfig())
    assert decoded["gender"].tolist() == [1, 0, UNKNOWN, 1]  # model.GENDERS order: male, female
    assert decoded["ethnicity"].tolist() == [0, UNKNOWN, 4, 2]
    only_gender = decode_faces(table.append_column("gender", pa.array(["male"] * 4)), None, 0.0, CropConfig())
    assert only_gender["gender"].tolist() == [0] * 4 and only_gender["ethnicity"].tolist() == [UNKNOWN] * 4


def test_a_run_folder_is_resumed_only_with_the_same_settings(tmp_path):
    fs, out = storage.resolve(str(tmp_path / "run"))

    def prepare(cfg: TrainConfig, path=out) -> bool:
        return storage.prepare_run_dir(fs, path, cfg.out, to_dict(cfg), cfg.overwrite, train.RESUMABLE_CHANGES, "training run")

    cfg = train_config(data="d", out=str(tmp_path / "run"), epochs=4)
    assert prepare(cfg) is False  # new: config.json written
    assert json.loads((tmp_path / "run" / "config.json").read_text())["epochs"] == 4
    longer_on_two = train_config(data="d", out=str(tmp_path / "run"), epochs=9, workers=2)
    assert prepare(longer_on_two) is True
    other_lr = train_config(data="d", out=str(tmp_path / "run"), lr=0.1)
    with pytest.raises(ValueError, match="other settings \\(lr\\)"):
        prepare(other_lr)
    (tmp_path / "run" / "summary.json").write_text("{}")
    with pytest.raises(storage.OutputExistsError, match="finished training run: pass --overwrite"):
        prepare(cfg)
    fresh = train_config(data="d", out=str(tmp_path / "run"), lr=0.1, overwrite=True)
    assert prepare(fresh) is False
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(storage.OutputExistsError, match="not a training run"):
        prepare(train_config(data="d", out=str(tmp_path / "other")), storage.resolve(str(tmp_path / "other"))[1])


def test_fine_tuning_takes_the_models_switches_and_refuses_other_scales_or_switches(tmp_path):
    plain = C3AE(ModelConfig(se=False, cascade=False))
    save_model(plain, tmp_path / "plain.pt", crop_config=to_dict(CropConfig()), meta={"val_mae": 5.0})
    cfg = train_config(data="d", out="o", init_from=str(tmp_path / "plain.pt"))
    adopted, state, provenance = train.initial_weights(cfg, CropConfig())
    assert adopted.model == plain.cfg and adopted.learning_rate == 0.002
    assert torch.equal(state["w1.weight"], plain.state_dict()["w1.weight"])
    assert provenance["meta"]["val_mae"] == 5.0
    with pytest.raises(ValueError, match="scales \\[1.0, 1.5, 2.0\\], the data has \\[1.0, 2.0, 3.0\\]"):
        train.initial_weights(cfg, CropConfig(scales=(1.0, 2.0, 3.0)))
    no_context = train_config(data="d", out="o", init_from=str(tmp_path / "plain.pt"), model={"context": False})
    with pytest.raises(ValueError, match="does not match the asked model config in: context"):
        train.initial_weights(no_context, CropConfig())
    save_model(C3AE(ModelConfig(n_bins=10)), tmp_path / "bins.pt", crop_config=to_dict(CropConfig()))
    with pytest.raises(ValueError, match="other age bins \\(n_bins 10\\) than this run \\(n_bins 12\\)"):
        train.initial_weights(replace_init(cfg, tmp_path / "bins.pt"), CropConfig())
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a C3AE model file"):
        train.initial_weights(replace_init(cfg, tmp_path / "junk.pt"), CropConfig())


def test_fine_tuning_an_age_model_can_add_heads_that_start_fresh(tmp_path):
    torch.manual_seed(0)
    age_only = C3AE()
    save_model(age_only, tmp_path / "age.pt", crop_config=to_dict(CropConfig()))
    cfg = train_config(data="d", out="o", init_from=str(tmp_path / "age.pt"), model={"gender_head": True})
    adopted, state, _ = train.initial_weights(cfg, CropConfig())
    assert adopted.model.gender_head and not adopted.model.ethnicity_head
    model, _, _ = loop.build_training(adopted, state, "cpu")
    assert torch.equal(model.w1.weight, age_only.w1.weight) and model.gender is not None
    save_model(model, tmp_path / "gender.pt", crop_config=to_dict(CropConfig()))
    kept, _, _ = train.initial_weights(train_config(data="d", out="o", init_from=str(tmp_path / "gender.pt")), CropConfig())
    assert kept.model.gender_head  # a file's head is kept when the run does not ask for it
    with pytest.raises(UserError, match="do not fit"):
        load_weights(C3AE(), model.state_dict())  # weights of a head the network lacks


def replace_init(cfg: TrainConfig, path, **model) -> TrainConfig:
    from dataclasses import replace

    return replace(cfg, init_from=str(path), model=ModelConfig(**model) if model else ModelConfig())


def test_the_curves_figure_plots_every_epochs_losses_and_metrics():
    history = [
        {"epoch": e, "train_loss": 30 / e, "val_loss": 32 / e, "train_l1": 15 / e, "train_kl": 1 / e, "val_kl": 1.2 / e,
         "val_mae": 14 / e, "val_ca3": 0.1 * e, "val_ca5": 0.15 * e, "val_ca7": 0.2 * e}
        for e in range(1, 5)
    ]
    figure = plots.training_curves(history)
    losses, errors, shares = figure.axes
    lines = {line.get_label(): line for axes in (losses, errors, shares) for line in axes.get_lines()}
    assert set(lines) == {"train loss", "val loss", "train l1", "train kl", "val kl", "val MAE (years)", "CA(3)", "CA(5)", "CA(7)"}
    assert list(lines["val MAE (years)"].get_xdata()) == [1, 2, 3, 4]
    np.testing.assert_allclose(lines["val MAE (years)"].get_ydata(), [14, 7, 14 / 3, 3.5])
    np.testing.assert_allclose(lines["CA(5)"].get_ydata(), [0.15, 0.3, 0.45, 0.6])
    np.testing.assert_allclose(lines["train loss"].get_ydata(), [30, 15, 10, 7.5])
    image = cv2.imdecode(np.frombuffer(plots.png(figure), np.uint8), cv2.IMREAD_COLOR)
    assert image.shape[1] > 800


def test_an_epoch_and_a_validation_pass_without_ray():
    """The worker's loop on plain tensor batches (what Ray Data's iter_torch_batches yields)."""
    table, _ = face_rows(12)
    decoded = decode_faces(table, None, 0.0, CropConfig())
    batches = [{k: torch.from_numpy(v[i : i + 6]) for k, v in decoded.items()} for i in (0, 6)]
    cfg = train_config(data="d", out="o")
    model, optimizer, _ = loop.build_training(cfg, None, torch.device("cpu"))
    seen = []
    before = [p.detach().clone() for p in model.parameters()]
    record = loop.train_epoch(model, optimizer, batches, cfg, torch.Generator(), torch.device("cpu"), seen.append)
    assert seen == [6, 12] and record["train_samples"] == 12
    assert np.isfinite(record["train_loss"]) and record["train_loss"] >= record["train_l1"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    metrics = loop.validate(model, batches, cfg, torch.device("cpu"))
    assert metrics["val_samples"] == 12 and metrics["val_mae"] > 0
    assert 0 <= metrics["val_ca3"] <= metrics["val_ca5"] <= metrics["val_ca7"] <= 1
    with torch.no_grad():
        errors = (model.eval()(torch.cat([crop_batch(b["region"], b["boxes"]) for b in batches]))[0]
                  - torch.from_numpy(decoded["age"])).abs()
    assert metrics["val_mae"] == pytest.approx(errors.mean().item(), rel=1e-5)


def test_with_a_gender_head_the_loop_trains_it_and_validation_reports_its_accuracy():
    table, _ = face_rows(12)
    genders = ["female", "male", None] * 4
    decoded = decode_faces(table.append_column("gender", pa.array(genders)), None, 0.0, CropConfig())
    batches = [{k: torch.from_numpy(v[i : i + 6]) for k, v in decoded.items()} for i in (0, 6)]
    cfg = train_config(data="d", out="o", model={"gender_head": True, "ethnicity_head": True})
    model, optimizer, _ = loop.build_training(cfg, None, torch.device("cpu"))
    before = model.gender.weight.detach().clone()
    record = loop.train_epoch(model, optimizer, batches, cfg, torch.Generator(), torch.device("cpu"))
    assert record["train_gender"] > 0 and record["train_ethnicity"] == 0  # no ethnicity labels here
    assert not torch.equal(before, model.gender.weight)
    metrics = loop.validate(model, batches, cfg, torch.device("cpu"))
    with torch.no_grad():
        predicted = model.eval()(torch.cat([crop_batch(b["region"], b["boxes"]) for b in batches])).gender.argmax(1)
    known = torch.from_numpy(decoded["gender"]) != UNKNOWN
    expected = (predicted[known] == torch.from_numpy(decoded["gender"])[known]).float().mean().item()
    assert metrics["val_gender_acc"] == pytest.approx(expected)
    assert "val_gender_acc" not in loop.validate(loop.build_training(train_config(data="d", out="o"), None, "cpu")[0],
                                                 batches, train_config(data="d", out="o"), torch.device("cpu"))
