import dataclasses
import io

import pytest
import torch

from tests.oracles import crops_to_tensor
from c3ae_ray.model import (
    BUNDLED_MODEL,
    VARIANTS,
    C3AE,
    ModelConfig,
    c3ae_loss,
    count_parameters,
    load_model,
    save_model,
    two_point,
)


def test_parameter_counts_match_the_paper():
    plain = count_parameters(C3AE(VARIANTS["plain"]))
    full = count_parameters(C3AE(VARIANTS["full"]))
    assert abs(plain - 36_345) / 36_345 < 0.02, plain
    assert abs(full - 39_700) / 39_700 < 0.05, full
    assert full - plain == 3 * 1_072  # three SE blocks 32 -> 16 -> 32
    assert count_parameters(C3AE().trunk.feat) == 6_156  # the paper's Feat layer


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_shapes_for_every_variant(variant):
    cfg = VARIANTS[variant]
    model = C3AE(cfg).eval()
    age, distribution = model(torch.randint(0, 256, (5, 3, 3, 64, 64), dtype=torch.uint8))
    assert age.shape == (5,)
    if cfg.cascade:
        assert distribution.shape == (5, 12)
        torch.testing.assert_close(distribution.sum(1), torch.ones(5))
    else:
        assert distribution is None


def test_no_context_uses_only_the_outermost_crop():
    model = C3AE(context=False).eval()
    crops = torch.randint(0, 256, (2, 3, 3, 64, 64)).float()
    changed = crops.clone()
    changed[:, :2] = 0  # the two inner scales
    torch.testing.assert_close(model(crops)[0], model(changed)[0])
    changed[:, 2] = 0
    assert not torch.allclose(model(crops)[0], model(changed)[0])


def test_mirror_average_averages_each_face_with_its_mirror_image_in_eval_mode_only():
    trained, _ = load_model(BUNDLED_MODEL)  # an untrained model answers nearly one age for any crops
    plain, mirrored = (C3AE(dataclasses.replace(trained.cfg, mirror_average=on)).eval() for on in (False, True))
    plain.load_state_dict(trained.state_dict())
    mirrored.load_state_dict(trained.state_dict())
    torch.manual_seed(0)
    crops = torch.randint(0, 256, (4, 3, 3, 64, 64)).float()
    age, distribution = mirrored(crops)
    (age_a, dist_a), (age_b, dist_b) = plain(crops), plain(crops.flip(-1))
    torch.testing.assert_close(age, (age_a + age_b) / 2)
    torch.testing.assert_close(distribution, (dist_a + dist_b) / 2)
    assert (age - age_a).abs().max() > 0.1  # random crops are not symmetric: the mirror pass counts
    symmetric = torch.cat([crops[..., :32], crops[..., :32].flip(-1)], dim=-1)
    torch.testing.assert_close(mirrored(symmetric)[0], plain(symmetric)[0])
    mirrored.train()
    plain.train()
    torch.manual_seed(1)
    in_training = mirrored(crops)[0]
    torch.manual_seed(1)  # the same dropout draws
    torch.testing.assert_close(in_training, plain(crops)[0])


def test_forward_rejects_wrong_shapes():
    with pytest.raises(ValueError, match=r"\(N, 3, 3, 64, 64\)"):
        C3AE()(torch.zeros(2, 3, 64, 64, 3))


def test_crops_to_tensor_moves_channels_first():
    crops = torch.arange(2 * 3 * 64 * 64 * 3).reshape(2, 3, 64, 64, 3)
    tensor = crops_to_tensor(crops.numpy())
    assert tensor.shape == (2, 3, 3, 64, 64)
    assert tensor[1, 2, 1, 10, 20] == crops[1, 2, 10, 20, 1]


@pytest.mark.parametrize(
    "age, expected",
    [
        (68, {6: 0.2, 7: 0.8}),  # the paper's example
        (60, {6: 1.0}),  # on a bin
        (0, {0: 1.0}),
        (110, {11: 1.0}),  # the last bin
        (125, {11: 1.0}),  # above the last bin: clipped
        (-3, {0: 1.0}),
        (5, {0: 0.5, 1: 0.5}),
        (109.9, {10: 0.01, 11: 0.99}),
    ],
)
def test_two_point_cases(age, expected):
    encoding = two_point(age)
    assert encoding.shape == (12,)
    dense = torch.zeros(12)
    for index, value in expected.items():
        dense[index] = value
    torch.testing.assert_close(encoding, dense, atol=1e-5, rtol=0)


def test_two_point_sums_to_one_and_its_expectation_is_the_age():
    ages = torch.linspace(0, 110, 1101)
    encoding = two_point(ages)
    assert encoding.shape == (1101, 12)
    torch.testing.assert_close(encoding.sum(1), torch.ones(1101))
    torch.testing.assert_close(encoding @ ModelConfig().bins, ages, atol=1e-4, rtol=0)


def test_two_point_follows_the_configured_bins():
    encoding = two_point(7.5, interval=5, n_bins=4)
    torch.testing.assert_close(encoding, torch.tensor([0.0, 0.5, 0.5, 0.0]))


def test_loss_parts():
    torch.manual_seed(0)
    model = C3AE()
    age_true = torch.tensor([68.0, 25.0])
    perfect = two_point(age_true)
    loss = c3ae_loss(model, torch.tensor([70.0, 20.0]), perfect, age_true, alpha=10.0)
    assert loss["kl"].item() == pytest.approx(0.0, abs=1e-5)  # predicted == target distribution
    assert loss["l1"].item() == pytest.approx(3.5)
    assert loss["total"].item() == pytest.approx(3.5, abs=1e-4)

    uniform = torch.full((2, 12), 1 / 12)
    loss = c3ae_loss(model, age_true, uniform, age_true, alpha=10.0)
    entropy = -(perfect.clamp_min(1e-12).log() * perfect).sum(1).mean()
    expected_kl = torch.log(torch.tensor(12.0)) - entropy
    assert loss["kl"].item() == pytest.approx(expected_kl.item(), rel=1e-4)
    assert loss["l1"].item() == 0
    assert loss["total"].item() == pytest.approx(10 * expected_kl.item(), rel=1e-4)


def test_no_cascade_loss_has_no_kl():
    model = C3AE(cascade=False)
    age, distribution = model(torch.zeros(2, 3, 3, 64, 64))
    loss = c3ae_loss(model, age, distribution, torch.tensor([30.0, 40.0]))
    assert loss["kl"].item() == 0
    loss["total"].backward()
    assert model.trunk.feat.weight.grad is not None


def test_model_file_round_trip(tmp_path):
    model = C3AE(VARIANTS["no-cascade"]).eval()
    path = tmp_path / "model.pt"
    size = save_model(model, path, crop_config={"scales": [1.0, 1.5, 2.0]}, meta={"epochs": 3})
    assert size == path.stat().st_size < 250_000
    torch.load(path, weights_only=True)  # plain values and tensors only
    loaded, payload = load_model(path)
    assert loaded.cfg == model.cfg
    assert payload["meta"] == {"epochs": 3}
    crops = torch.randint(0, 256, (3, 3, 3, 64, 64)).float()
    torch.testing.assert_close(loaded(crops)[0], model(crops)[0])


def test_load_model_refuses_other_files(tmp_path):
    not_torch = tmp_path / "notes.pt"
    not_torch.write_text("hello")
    with pytest.raises(ValueError, match="not a C3AE model file"):
        load_model(not_torch)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="not a C3AE model file"):
        load_model(other)
    buffer = io.BytesIO()
    save_model(C3AE(), buffer)
    payload = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    payload["model_config"]["n_layers"] = 9
    tampered = tmp_path / "tampered.pt"
    torch.save(payload, tampered)
    with pytest.raises(ValueError, match="unknown .*model setting.*n_layers; allowed: context"):
        load_model(tampered)
