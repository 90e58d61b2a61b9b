"""PyTorch networks run on CPUs by ONNX Runtime, for inference (MTCNN's three networks and C3AE).

The network is exported in memory when a stage starts (tenths of a second), from the same weights, so there is
no file to keep in step with the model. Its answers equal PyTorch's within float rounding (about 1e-6; tested).
On one photo's small tensors PyTorch's per-operator overhead outweighs the arithmetic: P-Net over a pyramid
takes about half of PyTorch's time here, C3AE about four fifths, R-Net and O-Net about the same
(`benchmarks/peer_speed.py`, docs/benchmarks.md). GPUs keep PyTorch.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch


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
            torch.onnx.export(module.eval(), (example,), buffer, input_names=["x"], dynamic_axes={"x": dynamic_axes}, dynamo=False)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads sleep, not spin
        self.session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.session.run(None, {"x": np.ascontiguousarray(x.detach().numpy(), dtype=np.float32)})
        return tuple(torch.from_numpy(output) for output in outputs)
