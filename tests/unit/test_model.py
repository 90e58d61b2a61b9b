import dataclasses
import io

import pytest
import torch

from tests.oracles import crops_to_tensor
from c3ae_ray.model import (
    BUNDLED_MODEL,
    VARIANTS,
    C3AE,
    Ensemble,
    ModelConfig,
    UNKNOWN,
    Prediction,
    c3ae_loss,
    count_parameters,
    encode_age,
    for_inference,
    gaussian,
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
    age, distribution, gender, ethnicity = model(torch.randint(0, 256, (5, 3, 3, 64, 64), dtype=torch.uint8))
    assert age.shape == (5,) and gender is None and ethnicity is None
    if cfg.cascade:
        assert distribution.shape == (5, 12)
        torch.testing.assert_close(distribution.sum(1), torch.ones(5))
    else:
        assert distribution is None


def test_no_context_uses_only_the_outermost_crop():
    torch.manual_seed(0)
    model = C3AE(context=False).eval()
    crops = torch.randint(0, 256, (2, 3, 3, 64, 64)).float()
    changed = crops.clone()
    changed[:, :2] = 0  # the two inner scales
    torch.testing.assert_close(model(crops).distribution, model(changed).distribution)
    changed[:, 2] = 0
    # an untrained model answers nearly one age for anything: compare its bins, exactly
    assert not torch.equal(model(crops).distribution, model(changed).distribution)


def test_mirror_average_averages_each_face_with_its_mirror_image_in_eval_mode_only():
    trained, _ = load_model(BUNDLED_MODEL)  # an untrained model answers nearly one age for any crops
    plain, mirrored = (C3AE(dataclasses.replace(trained.cfg, mirror_average=on)).eval() for on in (False, True))
    plain.load_state_dict(trained.state_dict())
    mirrored.load_state_dict(trained.state_dict())
    torch.manual_seed(0)
    crops = torch.randint(0, 256, (4, 3, 3, 64, 64)).float()
    age, distribution, _, _ = mirrored(crops)
    (age_a, dist_a, _, _), (age_b, dist_b, _, _) = plain(crops), plain(crops.flip(-1))
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


def test_gaussian_label_distribution_centres_on_the_age_and_trains_the_bins():
    ages = torch.tensor([0.0, 30.0, 47.5, 200.0])
    encoded = gaussian(ages, sigma=2.0)  # K = 1: bins 0..110
    assert encoded.shape == (4, 111)
    torch.testing.assert_close(encoded.sum(1), torch.ones(4))
    torch.testing.assert_close((encoded[1:3] * torch.arange(111.0)).sum(1), ages[1:3])  # interior: mean = age
    assert encoded[3].argmax() == 110  # clipped to the last bin
    assert abs(encoded[1, 28].item() - encoded[1, 32].item()) < 1e-6 and encoded[1, 30] > encoded[1, 32]
    cfg = ModelConfig(label_encoding="gaussian", n_bins=111, interval=1.0, sigma=2.0)
    model = C3AE(cfg)
    target = encode_age(ages[:3], cfg)
    perfect = c3ae_loss(model, Prediction(ages[:3], target), ages[:3])
    assert perfect["kl"].item() == pytest.approx(0, abs=1e-5)
    torch.testing.assert_close(encode_age(ages, ModelConfig()), two_point(ages))  # the default: the paper's
    with pytest.raises(ValueError, match="label_encoding must be one of two_point, gaussian"):
        ModelConfig(label_encoding="triangle")


def test_loss_parts():
    torch.manual_seed(0)
    model = C3AE()
    age_true = torch.tensor([68.0, 25.0])
    perfect = two_point(age_true)
    loss = c3ae_loss(model, Prediction(torch.tensor([70.0, 20.0]), perfect), age_true, alpha=10.0)
    assert loss["kl"].item() == pytest.approx(0.0, abs=1e-5)  # predicted == target distribution
    assert loss["l1"].item() == pytest.approx(3.5)
    assert loss["total"].item() == pytest.approx(3.5, abs=1e-4)

    uniform = torch.full((2, 12), 1 / 12)
    loss = c3ae_loss(model, Prediction(age_true, uniform), age_true, alpha=10.0)
    entropy = -(perfect.clamp_min(1e-12).log() * perfect).sum(1).mean()
    expected_kl = torch.log(torch.tensor(12.0)) - entropy
    assert loss["kl"].item() == pytest.approx(expected_kl.item(), rel=1e-4)
    assert loss["l1"].item() == 0
    assert loss["total"].item() == pytest.approx(10 * expected_kl.item(), rel=1e-4)


def test_no_cascade_loss_has_no_kl():
    model = C3AE(cascade=False)
    loss = c3ae_loss(model, model(torch.zeros(2, 3, 3, 64, 64)), torch.tensor([30.0, 40.0]))
    assert loss["kl"].item() == 0
    loss["total"].backward()
    assert model.trunk.feat.weight.grad is not None


def test_gender_and_ethnicity_heads_add_under_5_percent_and_answer_probabilities():
    full = count_parameters(C3AE())
    both = C3AE(gender_head=True, ethnicity_head=True).eval()
    assert full < count_parameters(both) <= 1.05 * full
    prediction = both(torch.randint(0, 256, (4, 3, 3, 64, 64), dtype=torch.uint8))
    assert prediction.gender.shape == (4, 2) and prediction.ethnicity.shape == (4, 5)
    p_female = prediction.p_female()
    assert p_female.shape == (4,) and ((0 < p_female) & (p_female < 1)).all()
    torch.testing.assert_close(p_female, torch.softmax(prediction.gender, 1)[:, 1])
    assert C3AE().eval()(torch.zeros(1, 3, 3, 64, 64)).p_female() is None


def test_head_losses_count_only_known_labels_and_weigh_in():
    torch.manual_seed(0)
    model = C3AE(gender_head=True, ethnicity_head=True)
    age = torch.tensor([30.0, 40.0, 50.0])
    logits = torch.tensor([[2.0, -1.0], [0.0, 3.0], [5.0, 5.0]])
    prediction = Prediction(age, two_point(age), logits, torch.zeros(3, 5))
    gender = torch.tensor([0, 1, UNKNOWN])
    loss = c3ae_loss(model, prediction, age, gender=gender, ethnicity=torch.tensor([UNKNOWN] * 3), gender_weight=2.0)
    expected = torch.nn.functional.cross_entropy(logits[:2], gender[:2])  # the unknown third face adds nothing
    assert loss["gender"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss["ethnicity"].item() == 0  # no face with a known ethnicity
    assert loss["total"].item() == pytest.approx(2.0 * expected.item(), rel=1e-4)  # age parts are 0 here
    no_labels = c3ae_loss(model, prediction, age)  # evaluation trials feed ages only
    assert "gender" not in no_labels and no_labels["total"].item() == pytest.approx(0, abs=1e-4)


def test_an_age_only_model_file_still_loads_without_heads(tmp_path):
    """Files written before the heads existed carry no head switches: they load as age-only models."""
    model = C3AE()
    save_model(model, tmp_path / "old.pt")
    payload = torch.load(tmp_path / "old.pt", weights_only=True)
    for switch in ("gender_head", "ethnicity_head"):
        del payload["model_config"][switch]
    torch.save(payload, tmp_path / "old.pt")
    loaded, _ = load_model(tmp_path / "old.pt")
    assert not loaded.cfg.gender_head and loaded.gender is None and loaded.ethnicity is None
    assert loaded(torch.zeros(1, 3, 3, 64, 64)).gender is None


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


def test_an_ensemble_answers_the_mean_of_its_members():
    torch.manual_seed(0)
    ensemble = Ensemble(ModelConfig(gender_head=True, ethnicity_head=True, mirror_average=True), 3).eval()
    crops = torch.randint(0, 256, (4, 3, 3, 64, 64)).float()
    with torch.no_grad():
        answer, each = ensemble(crops), [member(crops) for member in ensemble.members]
    torch.testing.assert_close(answer.age, torch.stack([a.age for a in each]).mean(0))
    torch.testing.assert_close(answer.distribution, torch.stack([a.distribution for a in each]).mean(0))
    torch.testing.assert_close(answer.p_female(), torch.stack([a.p_female() for a in each]).mean(0))
    assert not torch.allclose(each[0].age, each[1].age)  # the members differ (their own initial weights)
    with pytest.raises(ValueError, match="at least 2 members"):
        Ensemble(ModelConfig(), 1)


def test_an_ensemble_file_round_trip_and_its_refusals(tmp_path):
    ensemble = Ensemble(ModelConfig(gender_head=True), 3).eval()
    path = tmp_path / "ensemble.pt"
    size = save_model(ensemble, path, meta={"members": "three"})
    single = save_model(ensemble.members[0], io.BytesIO())
    assert 2.5 * single < size < 3.5 * single
    loaded, payload = load_model(path)
    assert isinstance(loaded, Ensemble) and len(loaded.members) == 3 and payload["members"] == 3
    crops = torch.randint(0, 256, (2, 3, 3, 64, 64)).float()
    with torch.no_grad():
        torch.testing.assert_close(loaded(crops).age, ensemble(crops).age)
    for members, message in ((1, "at least 2 members"), ("3", "at least 2 members"), (4, "do not fit")):
        tampered = torch.load(path, weights_only=True)
        tampered["members"] = members
        torch.save(tampered, tmp_path / "tampered.pt")
        with pytest.raises(ValueError, match=message):
            load_model(tmp_path / "tampered.pt")


@pytest.mark.parametrize("members", [None, 2])
def test_for_inference_folds_batch_norm_and_answers_as_the_model_does(members):
    torch.manual_seed(0)
    cfg = ModelConfig(gender_head=True, mirror_average=True)
    model = C3AE(cfg) if members is None else Ensemble(cfg, members)
    for norm in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # statistics as training leaves them
        norm.running_mean.uniform_(-2, 2), norm.running_var.uniform_(0.2, 3), norm.weight.data.uniform_(0.5, 2), norm.bias.data.uniform_(-1, 1)
    model.eval()
    folded = for_inference(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 4 * (members or 1)  # the model is untouched
    crops = torch.randint(0, 256, (5, 3, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        expected, answer = model(crops), folded(crops)
    torch.testing.assert_close(answer.age, expected.age, atol=1e-4, rtol=0)
    torch.testing.assert_close(answer.distribution, expected.distribution, atol=1e-5, rtol=0)
    torch.testing.assert_close(answer.p_female(), expected.p_female(), atol=1e-5, rtol=0)


def test_the_bundled_model_folded_answers_within_a_ten_thousandth_of_a_year():
    model, _ = load_model(BUNDLED_MODEL)
    crops = torch.randint(0, 256, (16, 3, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        difference = (for_inference(model)(crops).age - model(crops).age).abs().max().item()
    assert difference < 1e-4
