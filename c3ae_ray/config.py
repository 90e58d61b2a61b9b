"""One way to build any stage's config, and the errors a user can fix.

Every stage has one frozen dataclass with the paper's defaults. `build(cls, mapping)` turns a mapping (a YAML
file, the CLI's flags, a saved config.json, a Serve config's args) into it: nested dataclasses from nested
mappings, lists into tuples, ints into floats; an unknown key or a value of the wrong type is a `UserError`
that names the key and what is allowed. The dataclasses check their own values in `__post_init__`, so a
config that builds is one every later stage accepts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from functools import cache


class UserError(ValueError):
    """A mistake the user can fix (bad input, a wrong setting, an existing output): the CLI prints its message
    on one line and exits 1. Anything else is a bug and keeps its traceback."""


class NotFoundError(UserError, FileNotFoundError):
    """An input that does not exist."""


class OutputExistsError(UserError, FileExistsError):
    """An output that exists already and was not to be replaced."""


def to_dict(cfg) -> dict:
    """A config as plain values, as JSON and YAML hold them (tuples become lists); `build` reads it back."""

    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value

    return plain(dataclasses.asdict(cfg))


@cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def field_default(cls, dotted: str):
    """The default of a (nested) field, e.g. `field_default(TrainConfig, "model.context")`: help texts show it."""
    name, _, rest = dotted.partition(".")
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    if rest:
        return field_default(_dataclass_of(_hints(cls)[name]), rest)
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _dataclass_of(hint):
    """The dataclass in a hint such as `AugmentConfig | None`, or None."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
    return next((option for option in options if dataclasses.is_dataclass(option)), None)


def _convert(hint, value, key: str):
    """`value` as the field's type wants it, or a UserError naming the key."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, key)
            except UserError as error:
                errors.append(error)
        raise errors[0]
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise UserError(f"{key}: expected a mapping of {hint.__name__} settings, got {value!r}")
        return build(hint, value, key)
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            raise UserError(f"{key}: expected {len(items)} values, got {len(value)}")
        return tuple(_convert(item, v, key) for item, v in zip(items, value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is typing.Any or (isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        return value
    raise UserError(f"{key}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def build(cls, values, what: str | None = None):
    """A mapping -> `cls`, with every default of `cls` for what the mapping leaves out (see the module's doc)."""
    what = what or cls.__name__
    if isinstance(values, cls):
        return values
    if not isinstance(values, dict):
        raise UserError(f"{what}: expected a mapping of settings, got {values!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise UserError(f"unknown {what} setting(s): {', '.join(map(str, unknown))}; allowed: {', '.join(names)}")
    hints = _hints(cls)
    converted = {key: _convert(hints[key], value, f"{what}.{key}") for key, value in values.items()}
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in converted
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UserError(f"{what}: {', '.join(missing)} must be given")
    try:
        return cls(**converted)
    except TypeError as error:  # a value the dataclass's own checks could not compare or use
        raise UserError(f"{what}: {error}") from None


def nest(flat: dict) -> dict:
    """{"model.context": False, "epochs": 3} -> {"model": {"context": False}, "epochs": 3}: flags name nested fields."""
    nested: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        target = nested
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return nested


def merge(base: dict, override: dict) -> dict:
    """`override` over `base`, nested mappings merged key by key (a YAML file, then the flags given)."""
    merged = dict(base)
    for key, value in override.items():
        merged[key] = merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def load_yaml(location: str | None) -> dict:
    """A YAML mapping from a path or s3:// URI (None: empty)."""
    if not location:
        return {}
    import yaml

    from c3ae_ray import storage

    try:
        loaded = yaml.safe_load(storage.read_bytes(location))
    except yaml.YAMLError as error:
        raise UserError(f"{location} is not valid YAML: {error}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UserError(f"{location}: expected a mapping of settings")
    return loaded


def check(condition: bool, message: str) -> None:
    """A config's own rule: `__post_init__` calls it for every value the dataclass cannot type-check alone."""
    if not condition:
        raise UserError(message)


def resolve_device(device: str, gpus: float | None = None) -> str:
    """'auto' -> 'cuda' when there is a GPU, else 'cpu'; 'cuda' without one is a UserError.

    `gpus`: the Ray cluster's GPU count when the caller places work on a cluster; None asks this process's torch.
    """
    check(device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {device!r}")
    if gpus is None:
        import torch  # here, not at the top: a driver that only configures stages never loads torch

        available = torch.cuda.is_available()
    else:
        available = gpus > 0
    if device == "auto":
        return "cuda" if available else "cpu"
    check(device == "cpu" or available, f"--device cuda was asked for, but {'the Ray cluster has' if gpus is not None else 'this machine has'} no CUDA GPU")
    return device
