"""Declarative experiment specs: frozen dataclasses, validated on construction.

A spec is data. Arms are derived with ``dataclasses.replace`` (see ``registry``), overridden
with ``key.sub=value`` strings (type-checked; unknown keys list the valid ones), hashed for
dedup (``spec_hash``, seed excluded), round-tripped through JSON and flattened to MLflow params.
The KL schedule variants and teacher forcing are ``cvae.schedules`` dataclasses used as-is, so
a conditional parameter lives only on the variant that uses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, Union, get_args, get_origin

from cvae.model import OUTPUT_ACTIVATIONS, PRIOR_KINDS
from cvae.schedules import KL_KINDS, ConstantKL, CyclicalKL, KLSchedule, MonotonicKL, TeacherForcing
from cvae.train import EVAL_REDUCES, LATENT_SOURCES, LR_SCHEDULES, OPTIMIZERS, PRECISIONS


class SpecError(ValueError):
    """A spec, override or spec file is invalid. The message is one line for the user."""


def _choice(value: Any, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SpecError(f"{name}={value!r} is not valid; choose one of: {', '.join(choices)}")


def _positive(value: float, name: str) -> None:
    if not value > 0:
        raise SpecError(f"{name}={value} must be > 0")


@dataclass(frozen=True)
class ModelSpec:
    frame_dim: int = 128
    label_dim: int = 32
    latent_dim: int = 12
    decoder_dim: int = 192
    encoder_width: int = 16
    output_activation: Literal["sigmoid", "identity"] = "identity"
    prior: Literal["standard_normal", "learned"] = "standard_normal"

    def __post_init__(self) -> None:
        _choice(self.output_activation, "model.output_activation", OUTPUT_ACTIVATIONS)
        _choice(self.prior, "model.prior", PRIOR_KINDS)
        for name in ("frame_dim", "label_dim", "latent_dim", "decoder_dim", "encoder_width"):
            _positive(getattr(self, name), f"model.{name}")
        if self.latent_dim < 4 or self.decoder_dim < 8 or self.label_dim < 2:
            raise SpecError("model needs latent_dim >= 4, decoder_dim >= 8 and label_dim >= 2")


@dataclass(frozen=True)
class DataSpec:
    """``source`` is ``"synthetic"`` (the built-in dance dataset) or a lab-layout folder."""

    source: str = "synthetic"
    height: int = 32
    width: int = 64
    clip_len: int = 16
    partial: float = 1.0
    synthetic_seed: int = 0

    def __post_init__(self) -> None:
        if not self.source:
            raise SpecError("data.source must be 'synthetic' or a dataset folder")
        for name in ("height", "width"):
            if getattr(self, name) < 8:
                raise SpecError(f"data.{name}={getattr(self, name)} must be >= 8")
        if self.clip_len < 2:
            raise SpecError(f"data.clip_len={self.clip_len} must be >= 2")
        if not 0.0 < self.partial <= 1.0:
            raise SpecError(f"data.partial={self.partial} must be in (0, 1]")


@dataclass(frozen=True)
class OptimSpec:
    kind: Literal["adam", "adamw"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    # A factor on ``lr`` applied after the profile has set it, so an arm keeps its ratio to
    # the others at every profile (the calibration study's known-worse arm: 0.1).
    lr_scale: float = 1.0

    def __post_init__(self) -> None:
        _choice(self.kind, "optim.kind", OPTIMIZERS)
        _positive(self.lr, "optim.lr")
        _positive(self.lr_scale, "optim.lr_scale")
        if self.weight_decay < 0:
            raise SpecError(f"optim.weight_decay={self.weight_decay} must be >= 0")


@dataclass(frozen=True)
class LRScheduleSpec:
    kind: Literal["multistep", "cosine", "constant"] = "multistep"
    milestones: tuple[int, ...] = (2, 5)
    gamma: float = 0.1

    def __post_init__(self) -> None:
        _choice(self.kind, "lr_schedule.kind", LR_SCHEDULES)
        if any(m < 0 for m in self.milestones):
            raise SpecError(f"lr_schedule.milestones={self.milestones} must be >= 0")
        if not 0.0 < self.gamma <= 1.0:
            raise SpecError(f"lr_schedule.gamma={self.gamma} must be in (0, 1]")


@dataclass(frozen=True)
class TrainSpec:
    epochs: int = 70
    batch_size: int = 2
    grad_clip: float = 1.0
    detach_prev: bool = True
    # "bf16": training steps under bf16 autocast (opt-in; evaluation stays fp32). See README,
    # Performance, for its measured speed and effect on val PSNR.
    precision: Literal["fp32", "bf16"] = "fp32"
    # A replicate salt mixed into the seeding of every random stream (initialisation, clip
    # order, noise; experiments.runner.rng_seed): 0 is the seed itself. Another value makes a
    # copy of the same science that does not reproduce it bit for bit (the calibration
    # study's A/A arm).
    replicate: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise SpecError(f"train.epochs={self.epochs} must be >= 1")
        if self.batch_size < 1:
            raise SpecError(f"train.batch_size={self.batch_size} must be >= 1")
        _positive(self.grad_clip, "train.grad_clip")
        _choice(self.precision, "train.precision", PRECISIONS)
        if self.replicate < 0:
            raise SpecError(f"train.replicate={self.replicate} must be >= 0")


@dataclass(frozen=True)
class EvalSpec:
    """Validation: ``samples`` closed-loop rollouts with z from the prior (a sample, or its
    mean), every ``every`` epochs and always at the last one (``every`` above the epochs:
    once, at the end). ``reduce``: "mean" averages the samples' PSNR (the expected PSNR,
    estimated with less noise the more samples), "best" keeps the best of them (SVG's
    best-of-N; the lab's protocol is one sample, where the two agree)."""

    latent: Literal["prior_sample", "prior_mean"] = "prior_sample"
    samples: int = 1
    every: int = 1
    reduce: Literal["mean", "best"] = "mean"

    def __post_init__(self) -> None:
        _choice(self.latent, "eval.latent", tuple(s for s in LATENT_SOURCES if s != "posterior"))
        _choice(self.reduce, "eval.reduce", EVAL_REDUCES)
        if self.samples < 1:
            raise SpecError(f"eval.samples={self.samples} must be >= 1")
        if self.every < 1:
            raise SpecError(f"eval.every={self.every} must be >= 1")


@dataclass(frozen=True)
class ExperimentSpec:
    name: str
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    kl: KLSchedule = field(default_factory=CyclicalKL)
    teacher_forcing: TeacherForcing = field(default_factory=TeacherForcing)
    optim: OptimSpec = field(default_factory=OptimSpec)
    lr_schedule: LRScheduleSpec = field(default_factory=LRScheduleSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    seed: int = 0
    description: str = ""

    def __post_init__(self) -> None:
        # Registered specs are built in Python, not through ``_coerce``: a NaN written there
        # passes comparisons such as ``weight_decay < 0`` and would reach the optimizer.
        for key, value in _numbers(self):
            _finite(value, key)


def _numbers(obj: Any, prefix: str = "") -> list[tuple[str, float]]:
    """Every float in a (nested) spec dataclass, as (``section.key``, value)."""
    out: list[tuple[str, float]] = []
    for f in fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out += _numbers(value, f"{key}.")
        elif isinstance(value, float):
            out.append((key, value))
        elif isinstance(value, tuple):
            out += [(key, v) for v in value if isinstance(v, float)]
    return out


def _finite(value: float, key: str) -> None:
    if not math.isfinite(value):
        raise SpecError(f"{key}={value} must be a finite number")


SECTIONS: dict[str, type] = {
    "model": ModelSpec, "data": DataSpec, "teacher_forcing": TeacherForcing, "optim": OptimSpec,
    "lr_schedule": LRScheduleSpec, "train": TrainSpec, "eval": EvalSpec,
}
TOP_LEVEL = ("name", "seed", "description")


# ---------------------------------------------------------------------------------------------
# Construction that turns the dataclasses' ValueErrors into SpecErrors
# ---------------------------------------------------------------------------------------------
def _build(cls: type, **kwargs: Any) -> Any:
    try:
        return cls(**kwargs)
    except SpecError:
        raise
    except (ValueError, TypeError) as err:
        raise SpecError(str(err)) from None


def _kl_fields(kind: str) -> list[str]:
    return [f.name for f in fields(KL_KINDS[kind]) if f.name != "kind"]


# ---------------------------------------------------------------------------------------------
# Flattening, JSON, hashing
# ---------------------------------------------------------------------------------------------
def to_dict(spec: ExperimentSpec) -> dict[str, Any]:
    """Nested plain dict (tuples become lists); the KL variant carries its ``kind``."""
    return json.loads(json.dumps(dataclasses.asdict(spec)))


def from_dict(data: dict[str, Any]) -> ExperimentSpec:
    data = dict(data)
    kwargs: dict[str, Any] = {k: data.pop(k) for k in TOP_LEVEL if k in data}
    for section, cls in SECTIONS.items():
        if section in data:
            kwargs[section] = _build(cls, **_coerce_section(cls, data.pop(section), section))
    if "kl" in data:
        kl = dict(data.pop("kl"))
        kind = kl.pop("kind", "cyclical")
        _choice(kind, "kl.kind", tuple(KL_KINDS))
        kwargs["kl"] = _build(KL_KINDS[kind], **_coerce_section(KL_KINDS[kind], kl, "kl"))
    if data:
        raise SpecError(f"unknown spec section(s) {sorted(data)}; valid: "
                        f"{', '.join([*TOP_LEVEL, 'kl', *SECTIONS])}")
    return _build(ExperimentSpec, **kwargs)


def _coerce_section(cls: type, values: dict[str, Any], section: str) -> dict[str, Any]:
    # A KL variant's ``kind`` is its type, chosen separately; other sections' ``kind`` is data.
    is_kl = cls in KL_KINDS.values()
    valid = {f.name: f for f in fields(cls) if not (is_kl and f.name == "kind")}
    out = {}
    for key, value in values.items():
        if key not in valid:
            raise SpecError(f"unknown key {section}.{key}; valid: "
                            f"{', '.join(f'{section}.{k}' for k in valid)}")
        out[key] = _coerce(value, _field_type(cls, key), f"{section}.{key}")
    return out


def to_json(spec: ExperimentSpec) -> str:
    return json.dumps(to_dict(spec), indent=2, sort_keys=True)


def from_json(text: str) -> ExperimentSpec:
    return from_dict(json.loads(text))


# Keys added after runs were stored, left out of the hash at their default so that specs from
# before them keep their hash (and their stored runs).
HASH_OMITS_DEFAULT = {("train", "precision"): "fp32", ("train", "replicate"): 0,
                      ("optim", "lr_scale"): 1.0}


def spec_hash(spec: ExperimentSpec) -> str:
    """Content hash of the science: everything but the seed, name and description. Keys
    added later are left out where they mean what specs from before them did, so those keep
    their hash: those at their default in ``HASH_OMITS_DEFAULT`` (precision fp32, replicate
    0, lr_scale 1), and ``eval.reduce`` unless it averages several prior samples (one sample
    or the prior mean reduce alike; "best" is what came before)."""
    data = to_dict(spec)
    for key in TOP_LEVEL:
        data.pop(key, None)
    for (section, key), default in HASH_OMITS_DEFAULT.items():
        if data[section].get(key) == default:
            del data[section][key]
    evaluation = spec.eval
    if not (evaluation.reduce == "mean" and evaluation.samples > 1
            and evaluation.latent == "prior_sample"):
        del data["eval"]["reduce"]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def flatten(spec: ExperimentSpec) -> dict[str, Any]:
    """``{"kl.kind": "cyclical", "optim.lr": 0.001, ...}``: the MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in to_dict(spec).items():
        if isinstance(value, dict):
            for sub, inner in value.items():
                flat[f"{key}.{sub}"] = inner
        else:
            flat[key] = value
    return flat


# ---------------------------------------------------------------------------------------------
# Overrides: "key.sub=value"
# ---------------------------------------------------------------------------------------------
def valid_keys(spec: ExperimentSpec) -> list[str]:
    keys = [k for k in flatten(spec) if k not in ("name", "description")]
    kl_all = {f"kl.{name}" for kind in KL_KINDS for name in _kl_fields(kind)}
    return sorted(set(keys) | kl_all)


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (a string from the CLI, or a TOML/JSON value) to the field's type."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        text = str(value)
        _choice(text, key, tuple(str(a) for a in args))
        return text
    if origin in (Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if value is None or str(value).lower() == "none":
            return None
        return _coerce(value, non_none[0], key)
    if origin is tuple:
        items = value if isinstance(value, (list, tuple)) else \
            [v for v in str(value).strip("()[] ").split(",") if v.strip()]
        return tuple(_coerce(v, args[0], key) for v in items)
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise SpecError(f"{key}={value!r} is not a boolean; use true or false")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise SpecError(f"{key}={value!r} is not an integer")
        try:
            return int(value) if not isinstance(value, str) else int(value.strip())
        except ValueError:
            raise SpecError(f"{key}={value!r} is not an integer") from None
    if tp is float:
        if isinstance(value, bool):
            raise SpecError(f"{key}={value!r} is not a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise SpecError(f"{key}={value!r} is not a number") from None
        _finite(number, key)  # before the section's own checks: nan passes `nan < 0`
        return number
    if tp is str:
        return str(value)
    raise SpecError(f"{key}: unsupported type {tp}")


def apply_overrides(spec: ExperimentSpec, overrides: dict[str, Any]) -> ExperimentSpec:
    """Apply ``{"optim.lr": "3e-4", "kl.kind": "monotonic", ...}``; fails loudly on typos.

    ``kl.kind`` switches the variant first, carrying over the fields the new variant shares
    (ratio, start, stop, per); the other ``kl.*`` keys must exist on the resulting variant.
    """
    overrides = dict(overrides)
    keys = valid_keys(spec)
    for key in overrides:
        if key not in keys:
            raise SpecError(f"unknown key {key!r}; valid keys: {', '.join(keys)}")
    top = {k: _coerce(overrides.pop(k), _field_type(ExperimentSpec, k), k)
           for k in list(overrides) if k in TOP_LEVEL}
    spec = replace(spec, **top) if top else spec

    kl_values = {k[3:]: overrides.pop(k) for k in list(overrides) if k.startswith("kl.")}
    if kl_values:
        kind = str(kl_values.pop("kind", spec.kl.kind))
        _choice(kind, "kl.kind", tuple(KL_KINDS))
        cls = KL_KINDS[kind]
        carried = {name: getattr(spec.kl, name) for name in _kl_fields(kind)
                   if hasattr(spec.kl, name)}
        carried.update(_coerce_section(cls, kl_values, "kl"))
        spec = replace(spec, kl=_build(cls, **carried))

    by_section: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        by_section.setdefault(section, {})[name] = value
    for section, values in by_section.items():
        cls = SECTIONS[section]
        current = getattr(spec, section)
        new = _build(cls, **{**dataclasses.asdict(current),
                             **_coerce_section(cls, values, section)})
        spec = replace(spec, **{section: new})
    return spec


def parse_set(items: list[str]) -> dict[str, str]:
    """``["optim.lr=3e-4", ...]`` -> dict; a missing ``=`` is a SpecError."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"--set {item!r}: expected key=value, e.g. optim.lr=3e-4")
        out[key.strip()] = value.strip()
    return out


__all__ = [
    "ConstantKL", "CyclicalKL", "DataSpec", "EvalSpec", "ExperimentSpec", "LRScheduleSpec",
    "ModelSpec", "MonotonicKL", "OptimSpec", "SpecError", "TeacherForcing", "TrainSpec",
    "apply_overrides", "flatten", "from_dict", "from_json", "parse_set", "spec_hash",
    "to_dict", "to_json", "valid_keys",
]
