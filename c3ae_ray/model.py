"""C3AE (Zhang et al., CVPR 2019): the network, its two-point age encoding, its loss and its model file.

Shapes follow the paper's Table 1. One trunk is shared by the three context crops:

    64x64x3 -conv3x3x32 valid-> 62 -BRA-> 31 -conv-> 29 -BRA-> 14 -conv-> 12 -BRA-> 6
            -conv3x3x32 + BN + ReLU-> 4x4x32 -conv1x1x32-> 4x4x32 -flatten-> 512 -Feat-> 12

BRA = BatchNorm, ReLU, 2x2 average pooling. The full model adds squeeze-and-excitation (reduction 2)
after each BRA block (section 3.5). The three 12-d features are concatenated (context) and pass the
cascade: W1 to a softmax over age bins (trained with KL against the two-point encoding), W2 from that
distribution to the age (trained with L1).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from c3ae_ray.config import UserError, build, check
from c3ae_ray.crops import CROP_SIZE, N_SCALES, CropConfig

MODEL_FORMAT = "c3ae_ray.model/1"
# The model that ships in the package (see MODEL_CARD.md beside it): the default of predict, score and serve.
BUNDLED_MODEL = Path(__file__).with_name("pretrained") / "c3ae_utkface.pt"


@dataclass(frozen=True)
class ModelConfig:
    """The network's switches with the paper's defaults (full model)."""

    context: bool = True  # three scales; off: only the outermost crop
    cascade: bool = True  # W1 -> softmax bins -> W2, KL on the bins; off: W1 is a plain hidden layer
    se: bool = True  # squeeze-and-excitation after each BRA block
    n_bins: int = 12  # bins 0, 10, ..., 110
    interval: float = 10.0  # K in the paper
    feat_dim: int = 12
    channels: int = 32
    se_reduction: int = 2
    dropout_feat: float = 0.2  # on the flattened 4x4x32 map, before Feat
    dropout_head: float = 0.3  # on the concatenated features, before W1
    # Inference only (eval mode): average each face's age and bins with those of its mirror image. Training
    # flips faces anyway; this costs a second pass, small beside face detection, for 0.06 to 0.09 years here.
    mirror_average: bool = False
    # Pixel normalisation lives in the model so every caller feeds raw 0..255 values.
    pixel_mean: float = 127.5
    pixel_std: float = 127.5

    def __post_init__(self):
        check(self.n_bins >= 2 and self.interval > 0, f"model: n_bins must be at least 2 and interval positive, got {self.n_bins}, {self.interval}")
        check(0 <= self.dropout_feat < 1 and 0 <= self.dropout_head < 1, "model: dropout rates must be in [0, 1)")
        check(self.pixel_std > 0, f"model: pixel_std must be positive, got {self.pixel_std}")

    @property
    def bins(self) -> torch.Tensor:
        return torch.arange(self.n_bins, dtype=torch.float32) * self.interval

    @property
    def max_age(self) -> float:
        return (self.n_bins - 1) * self.interval


# The variants of the paper's Table 1 and ablation study (Fig. 5). "plain" is Table 1's network without SE;
# "no-se" has the same layers, listed under its ablation name so the ablation grid reads as the paper's.
VARIANTS: dict[str, ModelConfig] = {
    "full": ModelConfig(),
    "plain": ModelConfig(se=False),
    "no-context": ModelConfig(context=False),
    "no-cascade": ModelConfig(cascade=False),
    "no-se": ModelConfig(se=False),
}


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int):
        super().__init__()
        self.squeeze = nn.Linear(channels, channels // reduction)
        self.excite = nn.Linear(channels // reduction, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.sigmoid(self.excite(F.relu(self.squeeze(x.mean(dim=(2, 3))))))
        return x * weights[:, :, None, None]


class Trunk(nn.Module):
    """One 64x64 crop -> a 12-d feature; the same weights serve all three scales."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = cfg.channels
        layers: list[nn.Module] = []
        for i, in_channels in enumerate((3, c, c), start=1):
            block = [nn.Conv2d(in_channels, c, 3), nn.BatchNorm2d(c), nn.ReLU(), nn.AvgPool2d(2)]
            if cfg.se:
                block.append(SqueezeExcite(c, cfg.se_reduction))
            layers.append(nn.Sequential(*block))
        layers.append(nn.Sequential(nn.Conv2d(c, c, 3), nn.BatchNorm2d(c), nn.ReLU()))
        layers.append(nn.Conv2d(c, c, 1))
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(cfg.dropout_feat)
        self.feat = nn.Linear(4 * 4 * c, cfg.feat_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feat(self.dropout(self.features(x).flatten(1)))


class C3AE(nn.Module):
    """Forward: crops (N, 3 scales, 3 channels, 64, 64) with raw 0..255 values -> (age (N,), bins (N, B) or None)."""

    def __init__(self, cfg: ModelConfig | None = None, **switches):
        super().__init__()
        self.cfg = cfg or ModelConfig(**switches)
        cfg = self.cfg
        self.trunk = Trunk(cfg)
        n_scales = N_SCALES if cfg.context else 1
        self.dropout = nn.Dropout(cfg.dropout_head)
        self.w1 = nn.Linear(n_scales * cfg.feat_dim, cfg.n_bins)
        self.w2 = nn.Linear(cfg.n_bins, 1)
        with torch.no_grad():
            if cfg.cascade:
                # Start W2 as the expectation over the bin ages: the cascade then predicts a sensible age from
                # step one, and Adam (steps of about lr per weight) need not climb to weights near 110.
                self.w2.weight.copy_(cfg.bins[None])
                self.w2.bias.zero_()
            else:
                self.w2.bias.fill_(cfg.max_age / 2)

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        expected = (N_SCALES, 3, CROP_SIZE, CROP_SIZE)
        if crops.ndim != 5 or crops.shape[1:] != expected:
            raise ValueError(f"expected crops of shape (N, {', '.join(map(str, expected))}), got {tuple(crops.shape)}")
        if self.training or not self.cfg.mirror_average:
            return self._predict(crops)
        n = crops.shape[0]
        age, distribution = self._predict(torch.cat([crops, crops.flip(-1)]))  # each crop mirrored left-right
        return (age[:n] + age[n:]) / 2, None if distribution is None else (distribution[:n] + distribution[n:]) / 2

    def _predict(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = (crops.float() - self.cfg.pixel_mean) / self.cfg.pixel_std
        if not self.cfg.context:
            x = x[:, -1:]  # the outermost (largest) context only
        n, scales = x.shape[:2]
        # Channels-last lets oneDNN (CPU) and cuDNN pick their fast convolution kernels: about 1.3x on CPU here.
        x = x.reshape(n * scales, *x.shape[2:]).contiguous(memory_format=torch.channels_last)
        feats = self.trunk(x).reshape(n, -1)
        hidden = self.w1(self.dropout(feats))
        if self.cfg.cascade:
            distribution = torch.softmax(hidden, dim=1)
            return self.w2(distribution).squeeze(1), distribution
        return self.w2(F.relu(hidden)).squeeze(1), None


def two_point(age, interval: float = 10.0, n_bins: int = 12) -> torch.Tensor:
    """The paper's two-point encoding: 68 -> 0.2 at bin 60 and 0.8 at bin 70.

    Ages are clipped to [0, last bin]; an age on a bin puts all its mass there; the expectation over the
    bins gives the (clipped) age back. Works on a number or a tensor of any shape (adds a bin axis).
    """
    age = torch.as_tensor(age, dtype=torch.float32)
    position = age.clamp(0, (n_bins - 1) * interval) / interval
    lower = position.floor().clamp(max=n_bins - 1)
    upper_weight = position - lower
    lower = lower.long()
    upper = (lower + 1).clamp(max=n_bins - 1)
    encoding = torch.zeros(*age.shape, n_bins)
    encoding.scatter_add_(-1, lower.unsqueeze(-1), (1 - upper_weight).unsqueeze(-1))
    encoding.scatter_add_(-1, upper.unsqueeze(-1), upper_weight.unsqueeze(-1))
    return encoding


def c3ae_loss(
    model: C3AE,
    age_pred: torch.Tensor,
    distribution: torch.Tensor | None,
    age_true: torch.Tensor,
    alpha: float = 10.0,
) -> dict[str, torch.Tensor]:
    """alpha * KL(two_point(age) || predicted bins) + L1(age), with the parts for logging."""
    cfg = model.cfg
    l1 = (age_pred - age_true).abs().mean()
    if distribution is not None:
        target = two_point(age_true, cfg.interval, cfg.n_bins).to(distribution.device)
        kl = F.kl_div(distribution.clamp_min(1e-8).log(), target, reduction="batchmean")
    else:
        kl = torch.zeros((), device=age_pred.device)
    return {"total": alpha * kl + l1, "kl": kl.detach(), "l1": l1.detach()}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_model(model: C3AE, path, *, crop_config: dict | None = None, meta: dict | None = None) -> int:
    """Write the one model file every stage loads: weights plus plain values. Returns its size in bytes.

    `path` may be a filesystem path or a binary file object.
    """
    payload = {
        "format": MODEL_FORMAT,
        "model_config": asdict(model.cfg),
        "crop_config": dict(crop_config or {}),
        "meta": dict(meta or {}),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    if hasattr(path, "write"):
        path.write(data)
    else:
        Path(path).write_bytes(data)
    return len(data)


def load_model(source, name: str | None = None) -> tuple[C3AE, dict]:
    """Load a model file written by `save_model` (weights only, no pickled code) -> (model in eval mode, payload).

    `source`: a local path, an s3:// or gs:// URI, the file's bytes, or a binary file object (`name` then says
    what it is in errors). The payload also carries `sha256`, the file's digest, which names the exact weights.
    """
    if isinstance(source, bytes):
        data = source
    elif hasattr(source, "read"):
        data = source.read()
    else:
        from c3ae_ray import storage

        data = storage.read_bytes(str(source))
    name = name or (str(source) if isinstance(source, (str, Path)) else "model file")
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a file that is not a torch archive
        raise UserError(f"{name}: not a C3AE model file ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise UserError(f"{name}: not a C3AE model file (expected format {MODEL_FORMAT!r})")
    model = C3AE(build(ModelConfig, payload["model_config"], f"{name}: model"))
    model.load_state_dict(payload["state_dict"])
    payload["sha256"] = hashlib.sha256(data).hexdigest()
    return model.eval(), payload


def model_crop(payload: dict) -> CropConfig:
    """The crop geometry a model file was trained with (the default geometry for a file that records none)."""
    return build(CropConfig, payload.get("crop_config") or {}, "model file crop")


def model_identity(payload: dict, location) -> tuple[str, str]:
    """(name, version) that outputs carry: the file's own (a released model has them), else its file name and
    the start of its digest, so two different weights never share a version."""
    meta = payload.get("meta") or {}
    return str(meta.get("name") or Path(str(location)).stem), str(meta.get("version") or payload["sha256"][:12])
