"""ONNX Runtime on CPUs (`onnx_cpu`): MTCNN's networks and the model half answer as PyTorch does."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from c3ae_ray.detect import FaceDetector
from c3ae_ray.inference import AgeModel, predict_regions
from c3ae_ray.model import C3AE, Ensemble, ModelConfig, for_inference, save_model
from c3ae_ray.onnx_cpu import OnnxCpu, SplitPReLU, _with_split_prelus


def test_mtcnn_networks_answer_as_pytorch_at_every_input_size():
    detector = FaceDetector("cpu")
    networks, mtcnn = detector.networks, detector.mtcnn
    assert all(isinstance(net.__self__, OnnxCpu) for net in (networks.pnet, networks.rnet, networks.onet))
    generator = torch.Generator().manual_seed(0)
    inputs = [(networks.pnet, mtcnn.pnet, (n, 3, h, w)) for n, h, w in [(1, 12, 12), (1, 75, 75), (3, 53, 97), (2, 13, 31)]]
    inputs += [(networks.rnet, mtcnn.rnet, (n, 3, 24, 24)) for n in (1, 7)]
    inputs += [(networks.onet, mtcnn.onet, (n, 3, 48, 48)) for n in (1, 5)]
    for onnx, module, shape in inputs:
        x = torch.rand(shape, generator=generator) * 2 - 1  # MTCNN's inputs are scaled to -1..1
        with torch.inference_mode():
            expected = module(x)
        answers = onnx(x.numpy())  # detection's glue is numpy
        assert len(answers) == len(expected)
        for answer, value in zip(answers, expected):
            assert isinstance(answer, np.ndarray) and answer.shape == value.shape, shape
            torch.testing.assert_close(torch.as_tensor(answer), value, atol=1e-5, rtol=0)


def test_split_prelu_is_prelu_to_the_bit_and_the_original_module_is_kept():
    generator = torch.Generator().manual_seed(1)
    for prelu, shape in ((torch.nn.PReLU(10), (3, 10, 7, 5)), (torch.nn.PReLU(64), (4, 64)), (torch.nn.PReLU(), (2, 3, 4, 4))):
        torch.nn.init.uniform_(prelu.weight, -0.5, 0.8)
        x = torch.randn(shape, generator=generator) * 3
        x.view(-1)[:5] = torch.tensor([0.0, -0.0, 1e-38, -1e-38, float("inf")])
        assert torch.equal(SplitPReLU(prelu)(x), prelu(x))
    mtcnn = FaceDetector("cpu").mtcnn
    split = _with_split_prelus(mtcnn.onet)
    assert not any(isinstance(m, torch.nn.PReLU) for m in split.modules())
    assert sum(isinstance(m, torch.nn.PReLU) for m in mtcnn.onet.modules()) == 5  # untouched
    x = torch.randn(3, 3, 48, 48, generator=generator)
    with torch.inference_mode():
        assert all(torch.equal(a, b) for a, b in zip(split(x), mtcnn.onet(x)))


@pytest.mark.parametrize("kind", ["plain", "full, gender, mirror", "ensemble"])
def test_age_model_on_cpu_answers_as_pytorch_does(kind):
    torch.manual_seed(0)
    cfg = {"plain": ModelConfig(cascade=False),
           "full, gender, mirror": ModelConfig(gender_head=True, mirror_average=True),
           "ensemble": ModelConfig(gender_head=True, mirror_average=True)}[kind]
    model = Ensemble(cfg, 2) if kind == "ensemble" else C3AE(cfg)
    for norm in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # statistics as training leaves them
        norm.running_mean.uniform_(-2, 2), norm.running_var.uniform_(0.2, 3)
    buffer = io.BytesIO()
    save_model(model, buffer)
    age_model = AgeModel(buffer.getvalue(), "cpu")
    assert isinstance(age_model.network, OnnxCpu)
    rng = np.random.default_rng(3)
    for n in (1, 6):
        regions = rng.integers(0, 256, (n, 128, 128, 3), dtype=np.uint8)
        boxes = np.tile(np.array([[32, 32, 96, 96], [24, 24, 104, 104], [0, 0, 128, 128]], np.float32), (n, 1, 1))
        answer = age_model.predict(regions, boxes)
        expected = predict_regions(for_inference(model), regions, boxes)  # PyTorch's answers
        np.testing.assert_allclose(answer.age, expected.age, atol=1e-4, rtol=0)
        for name in ("distribution", "p_female"):
            value, reference = getattr(answer, name), getattr(expected, name)
            assert (value is None) == (reference is None), name
            if value is not None:
                np.testing.assert_allclose(value, reference, atol=1e-5, rtol=0)
