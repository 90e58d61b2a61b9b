"""The bundled model's accuracy on UTKFace faces it never trained on is what its model card states, measured
afresh from a new preprocessing of the shared `utkface` folder by the card command itself: the card's row for
that folder (the faces the project's age target, card.TARGET_MAE, is set on), and no worse there than the first
bundled model (5.49)."""

from __future__ import annotations

import re

import pytest

from c3ae_ray.card import TARGET_FOLDER, write_card
from c3ae_ray.model import BUNDLED_MODEL, load_model


def card_number(card: str, label: str) -> str:
    return re.search(rf"^\| {re.escape(label)} \| (.+?) \|$", card, re.M).group(1)


def row_cells(card: str, first: str) -> list[str]:
    """The cells after the first of the table row that starts with `first`."""
    return [cell.strip() for cell in re.search(rf"^\| {re.escape(first)} \|(.+)\|$", card, re.M).group(1).split("|")]


@pytest.mark.slow
def test_bundled_model_accuracy_on_the_held_out_faces_is_what_its_card_says(utkface_parquet, tmp_path):
    _, payload = load_model(BUNDLED_MODEL)
    measured = write_card(str(BUNDLED_MODEL), str(tmp_path), str(utkface_parquet))
    assert measured["faces"] == measured["target"]["faces"] >= 700  # only the utkface folder: all of it is the target's
    assert measured["target"]["mae"] <= 5.49, measured["target"]["mae"]  # the age-only model trained on this folder alone
    shipped = (BUNDLED_MODEL.parent / "MODEL_CARD.md").read_text()
    remade = (tmp_path / "MODEL_CARD.md").read_text()
    assert payload["sha256"] in shipped and payload["sha256"] in remade
    faces, mae, ca5, gender = row_cells(shipped, TARGET_FOLDER)  # the shipped card's row for the folder, measured on both
    assert (int(faces.replace(",", "")), mae, ca5) == (measured["faces"], f"{measured['mae']:.2f}", f"{measured['ca5']:.3f}")
    assert gender.split()[0] == f"{measured['gender_acc']:.3f}"
    assert card_number(remade, "MAE") == f"**{measured['mae']:.2f} years**"
