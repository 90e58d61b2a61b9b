"""C3AE (Zhang et al., CVPR 2019): the network, its two-point age encoding, its loss and its model file.

Shapes follow the paper's Table 1. One trunk is shared by the three context crops:

    64x64x3 -conv3x3x32 valid-> 62 -BRA-> 31 -conv-> 29 -BRA-> 14 -conv-> 12 -BRA-> 6
            -conv3x3x32 + BN + ReLU-> 4x4x32 -conv1x1x32-> 4x4x32 -flatten-> 512 -Feat-> 12

BRA = BatchNorm, ReLU, 2x2 average pooling. The full model adds squeeze-and-excitation (reduction 2)
after each BRA block (section 3.5). The three 12-d features are concatenated (context) and pass the
cascade: W1 to a softmax over age bins (trained with KL against the two-point encoding), W2 from that
distribution to the age (trained with L1). Optional heads on the same concatenated features: gender (two
classes, cross-entropy where the label exists) and ethnicity (UTKFace's five groups), the latter an
auxiliary training task only: no stage ever outputs it.
"""

from __future__ import annotations

import copy
import hashlib
import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from c3ae_ray.config import UserError, build, check
from c3ae_ray.crops import CROP_SIZE, N_SCALES, CropConfig

MODEL_FORMAT = "c3ae_ray.model/1"
# The model that ships in the package (see MODEL_CARD.md beside it): the default of predict, score and serve.
BUNDLED_MODEL = Path(__file__).with_name("pretrained") / "c3ae_utkface.pt"
LABEL_ENCODINGS = ("two_point", "gaussian")
GENDERS = ("male", "female")  # the gender head's classes, in its logits' order
N_ETHNICITIES = 5  # datasets.ETHNICITIES
UNKNOWN = -1  # the class code of a missing gender or ethnicity label: no loss for that face


@dataclass(frozen=True)
class ModelConfig:
    """The network's switches with the paper's defaults (full model)."""

    context: bool = True  # three scales; off: only the outermost crop
    cascade: bool = True  # W1 -> softmax bins -> W2, KL on the bins; off: W1 is a plain hidden layer
    se: bool = True  # squeeze-and-excitation after each BRA block
    n_bins: int = 12  # bins 0, 10, ..., 110
    interval: float = 10.0  # K in the paper
    # The bins' training target: the paper's "two_point" encoding, or a "gaussian" label distribution of `sigma`
    # years around the age (label distribution learning, usually with K = 1: n_bins 111, interval 1)
    label_encoding: str = "two_point"
    sigma: float = 2.0  # gaussian only
    feat_dim: int = 12
    channels: int = 32
    se_reduction: int = 2
    dropout_feat: float = 0.2  # on the flattened 4x4x32 map, before Feat
    dropout_head: float = 0.3  # on the concatenated features, before W1
    # Inference only (eval mode): average each face's age and bins with those of its mirror image. Training
    # flips faces anyway; this costs a second pass, small beside face detection, for 0.06 to 0.09 years here.
    mirror_average: bool = False
    gender_head: bool = False  # two logits (male, female) from the concatenated features
    ethnicity_head: bool = False  # five logits, trained as an auxiliary task; never an output
    # Pixel normalisation lives in the model so every caller feeds raw 0..255 values.
    pixel_mean: float = 127.5
    pixel_std: float = 127.5

    def __post_init__(self):
        check(self.n_bins >= 2 and self.interval > 0, f"model: n_bins must be at least 2 and interval positive, got {self.n_bins}, {self.interval}")
        check(0 <= self.dropout_feat < 1 and 0 <= self.dropout_head < 1, "model: dropout rates must be in [0, 1)")
        check(self.pixel_std > 0, f"model: pixel_std must be positive, got {self.pixel_std}")
        check(self.label_encoding in LABEL_ENCODINGS, f"model: label_encoding must be one of {', '.join(LABEL_ENCODINGS)}, got {self.label_encoding!r}")
        check(self.sigma > 0, f"model: sigma must be positive, got {self.sigma}")

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


class Prediction(NamedTuple):
    """The network's answer for a batch of faces; a head the model does not have is None."""

    age: torch.Tensor  # (N,) years
    distribution: torch.Tensor | None  # (N, bins) softmax; None without the cascade
    gender: torch.Tensor | None = None  # (N, 2) logits in GENDERS order
    ethnicity: torch.Tensor | None = None  # (N, 5) logits (auxiliary)

    def p_female(self) -> torch.Tensor | None:
        return None if self.gender is None else torch.softmax(self.gender.float(), dim=1)[:, GENDERS.index("female")]


class C3AE(nn.Module):
    """Forward: crops (N, 3 scales, 3 channels, 64, 64) with raw 0..255 values -> `Prediction`."""

    def __init__(self, cfg: ModelConfig | None = None, **switches):
        super().__init__()
        self.cfg = cfg or ModelConfig(**switches)
        cfg = self.cfg
        self.trunk = Trunk(cfg)
        n_scales = N_SCALES if cfg.context else 1
        self.dropout = nn.Dropout(cfg.dropout_head)
        self.w1 = nn.Linear(n_scales * cfg.feat_dim, cfg.n_bins)
        self.w2 = nn.Linear(cfg.n_bins, 1)
        self.gender = nn.Linear(n_scales * cfg.feat_dim, len(GENDERS)) if cfg.gender_head else None
        self.ethnicity = nn.Linear(n_scales * cfg.feat_dim, N_ETHNICITIES) if cfg.ethnicity_head else None
        with torch.no_grad():
            if cfg.cascade:
                # Start W2 as the expectation over the bin ages: the cascade then predicts a sensible age from
                # step one, and Adam (steps of about lr per weight) need not climb to weights near 110.
                self.w2.weight.copy_(cfg.bins[None])
                self.w2.bias.zero_()
            else:
                self.w2.bias.fill_(cfg.max_age / 2)

    def forward(self, crops: torch.Tensor) -> Prediction:
        expected = (N_SCALES, 3, CROP_SIZE, CROP_SIZE)
        if crops.ndim != 5 or crops.shape[1:] != expected:
            raise ValueError(f"expected crops of shape (N, {', '.join(map(str, expected))}), got {tuple(crops.shape)}")
        if self.training or not self.cfg.mirror_average:
            return self._predict(crops)
        n = crops.shape[0]
        both = self._predict(torch.cat([crops, crops.flip(-1)]))  # each crop mirrored left-right
        return Prediction(*(None if value is None else (value[:n] + value[n:]) / 2 for value in both))

    def _predict(self, crops: torch.Tensor) -> Prediction:
        x = (crops.float() - self.cfg.pixel_mean) / self.cfg.pixel_std
        if not self.cfg.context:
            x = x[:, -1:]  # the outermost (largest) context only
        n, scales = x.shape[:2]
        # Channels-last lets oneDNN (CPU) and cuDNN pick their fast convolution kernels: about 1.3x on CPU here.
        x = x.reshape(n * scales, *x.shape[2:]).contiguous(memory_format=torch.channels_last)
        feats = self.dropout(self.trunk(x).reshape(n, -1))
        hidden = self.w1(feats)
        heads = [None if head is None else head(feats) for head in (self.gender, self.ethnicity)]
        if self.cfg.cascade:
            distribution = torch.softmax(hidden, dim=1)
            return Prediction(self.w2(distribution).squeeze(1), distribution, *heads)
        return Prediction(self.w2(F.relu(hidden)).squeeze(1), None, *heads)


class Ensemble(nn.Module):
    """Several C3AEs of one config, trained with different seeds and data orders, answering as one model: the
    mean of their ages, of their distributions and of their gender probabilities (as log-probabilities, which
    are logits whose softmax is that mean). Every stage takes it where it takes a C3AE."""

    def __init__(self, cfg: ModelConfig, members: int):
        super().__init__()
        check(members >= 2, f"an ensemble needs at least 2 members, got {members}")
        self.cfg = cfg
        self.members = nn.ModuleList(C3AE(cfg) for _ in range(members))

    def forward(self, crops: torch.Tensor) -> Prediction:
        answers = [member(crops) for member in self.members]

        def mean(values: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack([value.float() for value in values]).mean(0)

        def mean_probabilities(logits: list[torch.Tensor | None]) -> torch.Tensor | None:
            return None if logits[0] is None else mean([torch.softmax(value.float(), dim=1) for value in logits]).log()

        return Prediction(
            mean([answer.age for answer in answers]),
            None if answers[0].distribution is None else mean([answer.distribution for answer in answers]),
            mean_probabilities([answer.gender for answer in answers]),
            mean_probabilities([answer.ethnicity for answer in answers]),
        )


def for_inference(model: C3AE | Ensemble) -> C3AE | Ensemble:
    """A copy in eval mode with every BatchNorm folded into the convolution before it and ReLUs in place: the
    same answers (within 1e-4 years) in about half the CPU time, where normalising and rectifying the
    first block's 62x62 maps cost as much as the convolutions. Never trained further (it has no BatchNorm)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(model).eval()
    for block in folded.modules():
        if isinstance(block, nn.Sequential) and [type(layer) for layer in block[:3]] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]:
            block[0], block[1], block[2] = fuse_conv_bn_eval(block[0], block[1]), nn.Identity(), nn.ReLU(inplace=True)
    return folded


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


HEADS = ("gender_head", "ethnicity_head")  # switches a fine-tuning run may add to a model file's network


def load_weights(model: C3AE, state: dict) -> None:
    """Another model's weights into `model`; a head `model` has and the weights lack starts fresh (fine-tuning
    an age-only model into one that also answers gender). Any other mismatch is an error."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    fresh = tuple(f"{head.removesuffix('_head')}." for head in HEADS)
    if unexpected or any(not key.startswith(fresh) for key in missing):
        raise UserError(f"the weights do not fit this network: missing {missing}, unexpected {unexpected}")


def masked_cross_entropy(logits: torch.Tensor | None, classes: torch.Tensor | None) -> torch.Tensor | None:
    """Mean cross-entropy over the faces whose class is known (UNKNOWN elsewhere); 0 when none is. None without
    the head or the labels."""
    if logits is None or classes is None:
        return None
    known = classes != UNKNOWN
    losses = F.cross_entropy(logits.float(), classes.clamp_min(0).long(), reduction="none")
    return (losses * known).sum() / known.sum().clamp_min(1)


def gaussian(age, sigma: float, interval: float = 1.0, n_bins: int = 111) -> torch.Tensor:
    """A label distribution: a normal density of `sigma` years around the (clipped) age over the bin ages,
    normalised to sum 1 on the bins. Any shape of ages (adds a bin axis)."""
    age = torch.as_tensor(age, dtype=torch.float32).clamp(0, (n_bins - 1) * interval)
    bins = torch.arange(n_bins, dtype=torch.float32) * interval
    density = torch.exp(-0.5 * ((bins - age.unsqueeze(-1)) / sigma) ** 2)
    return density / density.sum(-1, keepdim=True)


def encode_age(age, cfg: ModelConfig) -> torch.Tensor:
    """The bins' target for ages under the model's label encoding."""
    if cfg.label_encoding == "gaussian":
        return gaussian(age, cfg.sigma, cfg.interval, cfg.n_bins)
    return two_point(age, cfg.interval, cfg.n_bins)


def c3ae_loss(
    model: C3AE,
    prediction: Prediction,
    age_true: torch.Tensor,
    alpha: float = 10.0,
    gender: torch.Tensor | None = None,
    ethnicity: torch.Tensor | None = None,
    gender_weight: float = 1.0,
    ethnicity_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """alpha * KL(encoded age || predicted bins) + L1(age) [+ weighted cross-entropy of each head, where the
    labels exist], with the parts for logging (the heads' only where the model has them)."""
    cfg = model.cfg
    age_pred = prediction.age.float()
    l1 = (age_pred - age_true).abs().mean()
    if prediction.distribution is not None:
        target = encode_age(age_true, cfg).to(age_pred.device)
        kl = F.kl_div(prediction.distribution.float().clamp_min(1e-8).log(), target, reduction="batchmean")
    else:
        kl = torch.zeros((), device=age_pred.device)
    total, parts = alpha * kl + l1, {"kl": kl.detach(), "l1": l1.detach()}
    for name, logits, classes, weight in (("gender", prediction.gender, gender, gender_weight),
                                          ("ethnicity", prediction.ethnicity, ethnicity, ethnicity_weight)):
        loss = masked_cross_entropy(logits, classes)
        if loss is not None:
            total, parts[name] = total + weight * loss, loss.detach()
    return {"total": total, **parts}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_model(model: C3AE | Ensemble, path, *, crop_config: dict | None = None, meta: dict | None = None,
               age_range: dict | None = None) -> int:
    """Write the one model file every stage loads: weights plus plain values. Returns its size in bytes.

    `path` may be a filesystem path or a binary file object; `age_range` is `calibrate.AgeRange` as a dict. An
    ensemble's file says how many members its weights hold.
    """
    payload = {
        "format": MODEL_FORMAT,
        **({"members": len(model.members)} if isinstance(model, Ensemble) else {}),
        "model_config": asdict(model.cfg),
        "crop_config": dict(crop_config or {}),
        "meta": dict(meta or {}),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **({"age_range": dict(age_range)} if age_range else {}),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    if hasattr(path, "write"):
        path.write(data)
    else:
        Path(path).write_bytes(data)
    return len(data)


def load_model(source, name: str | None = None) -> tuple[C3AE | Ensemble, dict]:
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
    cfg = build(ModelConfig, payload["model_config"], f"{name}: model")
    members = payload.get("members")
    if members is not None and (not isinstance(members, int) or members < 2):
        raise UserError(f"{name}: an ensemble file needs at least 2 members, it says {members!r}")
    model = C3AE(cfg) if members is None else Ensemble(cfg, members)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise UserError(f"{name}: the weights do not fit the network the file describes ({str(exc).splitlines()[0]})") from None
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
