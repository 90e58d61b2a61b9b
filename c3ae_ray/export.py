"""`c3ae export`: a model file as ONNX or TorchScript for runtimes without this package.

Input: `crops`, uint8 (N, 3 scales, 3 channels, 64, 64) with raw 0..255 values, cut as `c3ae_ray.crops`
cuts them (smallest scale first); any N. Outputs: `age` (N,) in years, `distribution` (N, bins) over the
model's age bins, for a model file with an age range `age_low` and `age_high` (N,) (computed in the graph from
age and distribution as `c3ae_ray.calibrate.bounds` does), and for a model with a gender head `p_female` (N,).
Every export is checked against PyTorch on random crops before it is reported.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from c3ae_ray.calibrate import AgeRange, age_range_of, bounds
from c3ae_ray.config import UserError
from c3ae_ray.crops import CROP_SIZE, N_SCALES
from c3ae_ray.inference import Answers
from c3ae_ray.model import load_model

INPUT_SHAPE = (N_SCALES, 3, CROP_SIZE, CROP_SIZE)  # per face: scales, channels, height, width

FORMATS = ("onnx", "torchscript")
# The largest age difference from PyTorch an export may have on random pixels: the runtimes sum convolutions in
# another order, the distribution differs by about 1e-6 per bin, and bins up to 110 years make that 1-2e-4
PARITY_YEARS = 5e-4


class Exported(Answers):
    """The model's `Answers` (what ONNX Runtime runs in every stage on CPUs) with the age range where the file has
    one, as named outputs (exports need a fixed list): age, distribution, [age_low, age_high,] [p_female]. The
    ethnicity head, a training aid, is never exported."""

    def __init__(self, model, age_range: AgeRange | None = None):
        if not model.cfg.cascade:
            raise UserError("only a model with the two-point cascade has a distribution to export")
        super().__init__(model)
        self.age_range = age_range
        self.register_buffer("bins", model.cfg.bins)
        self.outputs = ["age", "distribution"] + ["age_low", "age_high"] * (age_range is not None) + ["p_female"] * model.cfg.gender_head

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, ...]:
        age, distribution, *p_female = super().forward(crops)
        ranged = () if self.age_range is None else bounds(age, distribution, self.age_range, self.bins)
        return (age, distribution, *ranged, *p_female)


def export_model(model_source, fmt: str, out: str) -> dict:
    """Write the export to `out` (a local path) and check it; -> a summary with the largest differences."""
    if fmt not in FORMATS:
        raise UserError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    model, payload = load_model(model_source)
    wrapper = Exported(model, age_range_of(payload)).eval()
    example = torch.randint(0, 256, (2, *INPUT_SHAPE), dtype=torch.uint8)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        if fmt == "torchscript":
            torch.jit.trace(wrapper, example).save(out)
        else:
            _export_onnx(wrapper, example, out)
    differences = parity(wrapper, fmt, out)
    if differences["age"] > PARITY_YEARS:
        raise RuntimeError(f"the {fmt} export differs from PyTorch by {differences['age']:.2g} years (over {PARITY_YEARS:g})")
    return {
        "model": str(model_source), "sha256": payload["sha256"], "format": fmt, "out": out, "outputs": wrapper.outputs,
        "bytes": Path(out).stat().st_size, **{f"max_{name}_difference": value for name, value in differences.items()},
    }


def _export_onnx(wrapper: Exported, example: torch.Tensor, out: str) -> None:
    # torch's exporter needs onnxscript; the parity check runs the export in onnxruntime.
    if any(importlib.util.find_spec(name) is None for name in ("onnxscript", "onnxruntime")):
        raise UserError("ONNX export needs the export extra: pip install 'c3ae-ray[export]'")
    torch.onnx.export(
        wrapper, (example,), out, input_names=["crops"], output_names=wrapper.outputs,
        dynamic_shapes={"crops": {0: torch.export.Dim("batch")}}, dynamo=True, external_data=False, verbose=False,
    )


def run_export(fmt: str, path: str, crops: np.ndarray, outputs: list[str]) -> dict[str, np.ndarray]:
    """Run an exported file the way its users would (onnxruntime for ONNX, torch.jit.load for TorchScript)
    -> {output name: array}."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        return dict(zip(outputs, session.run(outputs, {"crops": crops})))
    loaded = torch.jit.load(path)
    with torch.inference_mode():
        return {name: value.numpy() for name, value in zip(outputs, loaded(torch.from_numpy(crops)))}


def parity(wrapper: Exported, fmt: str, path: str, n: int = 17, seed: int = 0) -> dict[str, float]:
    """Largest |difference| of each output between the export and PyTorch on n random crops."""
    crops = np.random.default_rng(seed).integers(0, 256, (n, *INPUT_SHAPE), dtype=np.uint8)
    exported = run_export(fmt, path, crops, wrapper.outputs)
    with torch.inference_mode():
        expected = wrapper(torch.from_numpy(crops))
    return {name: float(np.abs(exported[name] - value.numpy()).max()) for name, value in zip(wrapper.outputs, expected)}
