"""The bundled model is small, loads, answers age and gender, and has its card."""

from __future__ import annotations

import torch

from c3ae_ray.model import BUNDLED_MODEL, count_parameters, load_model


def test_the_bundled_model_is_small_and_loads():
    assert BUNDLED_MODEL.stat().st_size <= 250_000  # 0.25 MB
    model, payload = load_model(BUNDLED_MODEL)
    assert model.cfg.context and model.cfg.cascade and model.cfg.se and model.cfg.gender_head
    assert count_parameters(model) <= 39_781 * 1.05  # within 5% of the paper's full model
    # No worse than shipped (the project's targets, card.TARGET_*, are 5.0 on the utkface folder's faces and 0.90
    # over all held-out faces; the training's own validation MAE is over all of them)
    assert payload["crop_config"] and payload["meta"]["val_mae"] <= 5.2 and payload["meta"]["val_gender_acc"] >= 0.90
    prediction = model.eval()(torch.zeros(2, 3, 3, 64, 64))
    assert prediction.p_female().shape == (2,)


def test_the_model_card_says_data_split_metrics_weaknesses_licence_and_how_to_reproduce():
    card = (BUNDLED_MODEL.parent / "MODEL_CARD.md").read_text()
    for heading in ("## Data", "## Split and protocol", "## Metrics", "## Known weaknesses", "## Reproduce"):
        assert heading in card
    assert "non-commercial research only" in card and "c3ae train" in card and "```yaml\nepochs: 12\n" in card
    assert "gender accuracy" in card and "| source folder |" in card and "| ethnicity (the dataset's label) |" in card
    assert (BUNDLED_MODEL.parent / "error_by_decade.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
