"""The bundled model's accuracy on UTKFace faces it never trained on is what its model card states, measured
afresh from a new preprocessing of the `utkface` folder's held-out images by the card command itself: the card's row for
that folder (the faces the project's age target, card.TARGET_MAE, is set on), and no worse there than the first
bundled model (5.49). Its age range holds its stated share of true ages on the held-out faces its calibration
never saw, and `c3ae calibrate` fits the same on this folder alone."""

from __future__ import annotations

import re

import pytest

import torch

from c3ae_ray.calibrate import age_range_of, calibrate_file
from c3ae_ray.card import TARGET_FOLDER, write_card
from c3ae_ray.model import BUNDLED_MODEL, load_model


def card_number(card: str, label: str) -> str:
    return re.search(rf"^\| {re.escape(label)} \| (.+?) \|$", card, re.M).group(1)


def row_cells(card: str, first: str) -> list[str]:
    """The cells after the first of the table row that starts with `first`."""
    return [cell.strip() for cell in re.search(rf"^\| {re.escape(first)} \|(.+)\|$", card, re.M).group(1).split("|")]


@pytest.mark.slow
def test_bundled_model_accuracy_on_the_held_out_faces_is_what_its_card_says(utkface_val_parquet, tmp_path):
    _, payload = load_model(BUNDLED_MODEL)
    measured = write_card(str(BUNDLED_MODEL), str(tmp_path), str(utkface_val_parquet))
    assert measured["faces"] == measured["target"]["faces"] >= 700  # only the utkface folder's held-out faces
    assert measured["target"]["mae"] <= 5.49, measured["target"]["mae"]  # the age-only model trained on this folder alone
    shipped = (BUNDLED_MODEL.parent / "MODEL_CARD.md").read_text()
    remade = (tmp_path / "MODEL_CARD.md").read_text()
    assert payload["sha256"] in shipped and payload["sha256"] in remade
    # The shipped card's row for the folder was measured on a preprocessing of both folders together: MTCNN's
    # batched stages can give a face a box a fraction of a pixel off with other images beside it in the batch
    # (and the second bundled model's card was measured with the smallest face at 20 px, which moved its row by
    # one face and 1.1 points of gender accuracy). Close, not to the last digit.
    faces, mae, ca5, gender = row_cells(shipped, TARGET_FOLDER)
    assert abs(int(faces.replace(",", "")) - measured["faces"]) <= 2
    assert abs(float(mae) - measured["mae"]) <= 0.05 and abs(float(ca5) - measured["ca5"]) <= 0.01
    assert abs(float(gender.split()[0]) - measured["gender_acc"]) <= 0.015
    assert card_number(remade, "MAE") == f"**{measured['mae']:.2f} years**"
    age_range = measured["age_range"]  # on the half of the held-out faces the shipped calibration did not use
    assert age_range["target_coverage"] == 0.8 and age_range["faces"] >= 350
    assert abs(age_range["coverage"] - 0.8) <= 0.05 and 10 <= age_range["mean_width"] <= 25, age_range
    assert f"it held\n**{100 * age_range['coverage']:.1f}%** of true ages" in remade


@pytest.mark.slow
def test_calibrate_fits_a_range_that_holds_on_faces_it_did_not_see(utkface_val_parquet, tmp_path):
    out = tmp_path / "calibrated.pt"
    summary = calibrate_file(str(BUNDLED_MODEL), str(utkface_val_parquet), str(out), coverage=0.9)
    fitted = summary["age_range"]
    assert fitted["coverage"] == 0.9 and fitted["faces"] >= 350 and fitted["check_faces"] >= 350
    assert abs(fitted["check_coverage"] - 0.9) <= 0.05, fitted
    original, _ = load_model(BUNDLED_MODEL)
    written, payload = load_model(out)
    assert age_range_of(payload).coverage == 0.9 and len(age_range_of(payload).below) == len(fitted["below"])
    assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), written.state_dict().values()))
