"""Layer-by-layer description of each model variant, like the paper's Table 1."""

from __future__ import annotations

import io
from dataclasses import dataclass

import torch
from torch import nn

from c3ae_ray.model import VARIANTS, C3AE, ModelConfig, SqueezeExcite, count_parameters, save_model

# Paper's figures: Table 1 gives the plain network 36,345 parameters, section 3.5 the full one (SE) 39.7K.
PAPER_PARAMETERS = {"plain": 36_345, "full": 39_700}


@dataclass
class Layer:
    name: str
    kind: str
    output_shape: tuple[int, ...]
    parameters: int


def _rows(module: nn.Module, prefix: str = ""):
    """The modules that get a row: leaves, and each SE block as one row."""
    for name, child in module.named_children():
        if isinstance(child, SqueezeExcite) or not list(child.children()):
            yield prefix + name, child
        else:
            yield from _rows(child, f"{prefix}{name}.")


def describe(cfg: ModelConfig) -> tuple[list[Layer], int, int]:
    """-> (layers with output shapes of one sample, trainable parameters, saved model file bytes)."""
    model = C3AE(cfg).eval()
    layers: dict[str, Layer] = {}

    def record(name: str):
        def hook(module: nn.Module, _inputs, output):
            if name not in layers:  # the trunk runs once per scale; its first run describes it
                params = sum(p.numel() for p in module.parameters())
                layers[name] = Layer(name, type(module).__name__, tuple(output.shape[1:]), params)

        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in _rows(model)]
    with torch.no_grad():
        model(torch.zeros(1, 3, 3, 64, 64))
    for handle in handles:
        handle.remove()
    buffer = io.BytesIO()
    size = save_model(model, buffer)
    return list(layers.values()), count_parameters(model), size


def summary_text() -> str:
    lines = []
    for variant, cfg in VARIANTS.items():
        layers, total, size = describe(cfg)
        switches = f"context={cfg.context} cascade={cfg.cascade} se={cfg.se}"
        lines.append(f"== {variant} ({switches})")
        lines.append(f"{'layer':<26}{'kind':<16}{'output':<18}{'params':>8}")
        for layer in layers:
            shape = "x".join(str(d) for d in layer.output_shape)
            lines.append(f"{layer.name:<26}{layer.kind:<16}{shape:<18}{layer.parameters:>8,}")
        paper = PAPER_PARAMETERS.get(variant)
        versus = f"  (paper: {paper:,}, {100 * (total - paper) / paper:+.1f}%)" if paper else ""
        lines.append(f"total trainable parameters: {total:,}{versus}")
        lines.append(f"saved model file: {size:,} bytes ({size / 2**20:.3f} MiB)")
        lines.append("")
    lines.append(
        "Notes: the trunk (trunk.*) is shared by the three scales and counted once; BatchNorm's running\n"
        "statistics are buffers, not parameters. Plain = 36,309 weights and biases + 256 BatchNorm\n"
        "scale/shift values. The paper's 36,345 is 36 more than our weights and biases alone; its Table 1\n"
        "gives no per-layer counts, so the 36 cannot be traced. Full = plain + 3 SE blocks of 1,072\n"
        "(32 -> 16 -> 32, with biases)."
    )
    return "\n".join(lines)
