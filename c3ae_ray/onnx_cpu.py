"""PyTorch networks run on CPUs by ONNX Runtime, for inference (MTCNN's three networks and C3AE).

The network is exported in memory when a stage starts (tenths of a second), from the same weights, so there is
no file to keep in step with the model. Its answers equal PyTorch's within float rounding (about 1e-6; tested).
On one photo's small tensors PyTorch's per-operator overhead outweighs the arithmetic: P-Net over a pyramid
takes about half of PyTorch's time here, C3AE about four fifths, R-Net and O-Net about the same
(`benchmarks/peer_speed.py`, docs/benchmarks.md). GPUs keep PyTorch.

MTCNN's PReLUs are exported as max(x, 0) + slope * min(x, 0) (`SplitPReLU`): ONNX Runtime's PRelu broadcasts a
per-channel slope slowly (over half of O-Net's time); the split form gives the same bits, and P-Net (76 px
level), R-Net (18 boxes) and O-Net (3 boxes) take 0.19, 0.54 and 0.51 ms instead of 0.38, 1.38 and 1.07.
"""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import torch


class SplitPReLU(torch.nn.Module):
    """`nn.PReLU` as max(x, 0) + slope * min(x, 0): bit for bit the same (one of the two terms is exactly 0)."""

    def __init__(self, prelu: torch.nn.PReLU):
        super().__init__()
        self.weight = prelu.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slope = self.weight.reshape(1, -1, *[1] * (x.dim() - 2)) if self.weight.numel() > 1 else self.weight
        return torch.clamp_min(x, 0) + slope * torch.clamp_max(x, 0)


def _with_split_prelus(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` whose PReLUs are `SplitPReLU`s (the module itself is left as it is)."""
    if not any(isinstance(child, torch.nn.PReLU) for child in module.modules()):
        return module
    module = copy.deepcopy(module)
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if isinstance(child, torch.nn.PReLU):
                setattr(parent, name, SplitPReLU(child))
    return module


class OnnxCpu:
    """`module(x)` for one float32 tensor -> the module's tensors as a tuple, computed by ONNX Runtime with as
    many threads as torch has when it is built (so a one-CPU replica stays on one)."""

    def __init__(self, module: torch.nn.Module, example: torch.Tensor, dynamic_axes: dict[int, str]):
        import onnxruntime

        buffer = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            # torch's TorchScript-based exporter: deprecated in favour of dynamo=True, which needs onnxscript and
            # takes seconds per network
            warnings.simplefilter("ignore")
            torch.onnx.export(_with_split_prelus(module).eval(), (example,), buffer, input_names=["x"], dynamic_axes={"x": dynamic_axes}, dynamo=False)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads sleep, not spin
        self.session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(torch.from_numpy(output) for output in self.run(x.detach().numpy()))

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        """The same on numpy arrays (what detection's glue holds)."""
        return self.session.run(None, {"x": np.ascontiguousarray(x, dtype=np.float32)})
