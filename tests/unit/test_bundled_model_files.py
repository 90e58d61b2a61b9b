"""The bundled model is small, loads, and has its card."""

from __future__ import annotations

from c3ae_ray.card import TARGET_MAE
from c3ae_ray.model import BUNDLED_MODEL, count_parameters, load_model


def test_the_bundled_model_is_small_and_loads():
    assert BUNDLED_MODEL.stat().st_size <= 250_000  # 0.25 MB
    model, payload = load_model(BUNDLED_MODEL)
    assert model.cfg.context and model.cfg.cascade and model.cfg.se and count_parameters(model) < 40_000
    assert payload["crop_config"] and payload["meta"]["val_mae"] <= TARGET_MAE


def test_the_model_card_says_data_split_metrics_weaknesses_licence_and_how_to_reproduce():
    card = (BUNDLED_MODEL.parent / "MODEL_CARD.md").read_text()
    for heading in ("## Data", "## Split and protocol", "## Metrics", "## Known weaknesses", "## Reproduce"):
        assert heading in card
    assert "non-commercial research only" in card and "c3ae train" in card and "```yaml\nepochs: 40\n" in card
    assert (BUNDLED_MODEL.parent / "error_by_decade.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
