"""Registered specs, named ablations, user TOML specs and profiles.

Every registered spec is derived from another with ``dataclasses.replace``. A user adds a spec
without touching the package with a TOML file::

    base = "report_final"          # any registered name (or another .toml path)
    name = "my_lr"                 # optional; defaults to the file's stem
    [optim]
    lr = 1e-4
    [kl]
    kind = "monotonic"

accepted wherever a registered name is (``python -m experiments run my_lr.toml``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import tomllib

from experiments.spec import (
    ConstantKL,
    CyclicalKL,
    DataSpec,
    EvalSpec,
    ExperimentSpec,
    LRScheduleSpec,
    ModelSpec,
    MonotonicKL,
    OptimSpec,
    SpecError,
    TeacherForcing,
    TrainSpec,
    apply_overrides,
)

# ---------------------------------------------------------------------------------------------
# The specs
# ---------------------------------------------------------------------------------------------
LAB_TEMPLATE = ExperimentSpec(
    name="lab_template",
    description="The course template's defaults (identity output, Adam 1e-3, multistep LR, "
                "70 epochs, TFR 1.0 decaying from epoch 10, cyclical KL 10 cycles ratio 1.0).",
    model=ModelSpec(output_activation="identity", prior="standard_normal"),
    data=DataSpec(),
    kl=CyclicalKL(cycles=10, ratio=1.0, start=0.0, stop=1.0),
    teacher_forcing=TeacherForcing(ratio=1.0, decay_start=10, decay_step=0.1),
    optim=OptimSpec(kind="adam", lr=1e-3),
    lr_schedule=LRScheduleSpec(kind="multistep", milestones=(2, 5), gamma=0.1),
    train=TrainSpec(epochs=70, batch_size=2, grad_clip=1.0),
    eval=EvalSpec(latent="prior_sample"),
)

REPORT_FINAL = replace(
    LAB_TEMPLATE,
    name="report_final",
    description="The report's final model (Table 3): sigmoid output, AdamW 3e-4, cosine LR, "
                "cyclical KL 40 cycles ratio 0.5 from 0.1, no teacher forcing, 400 epochs.",
    model=replace(LAB_TEMPLATE.model, output_activation="sigmoid"),
    kl=CyclicalKL(cycles=40, ratio=0.5, start=0.1, stop=1.0),
    teacher_forcing=TeacherForcing(ratio=0.0, decay_start=10, decay_step=0.1),
    optim=OptimSpec(kind="adamw", lr=3e-4, weight_decay=0.01),
    lr_schedule=LRScheduleSpec(kind="cosine"),
    train=replace(LAB_TEMPLATE.train, epochs=400),
)


def _arm(name: str, description: str, **changes: Any) -> ExperimentSpec:
    return replace(REPORT_FINAL, name=name, description=description, **changes)


SPECS: dict[str, ExperimentSpec] = {
    spec.name: spec
    for spec in [
        LAB_TEMPLATE,
        REPORT_FINAL,
        _arm("kl_cyclical", "Table 2: cyclical KL, 40 cycles, ratio 0.5.",
             kl=CyclicalKL(cycles=40, ratio=0.5, start=0.1, stop=1.0)),
        _arm("kl_monotonic", "Table 2: monotonic KL (one cycle), ratio 0.5.",
             kl=MonotonicKL(ratio=0.5, start=0.1, stop=1.0)),
        _arm("kl_constant", "Table 2: constant KL, beta = 1 throughout.",
             kl=ConstantKL(value=1.0)),
        _arm("tfr_decay", "Teacher forcing ratio 1.0, decaying by 0.1 per epoch from epoch 10.",
             teacher_forcing=TeacherForcing(ratio=1.0, decay_start=10, decay_step=0.1)),
        _arm("tfr_off", "Teacher forcing disabled (ratio 0).",
             teacher_forcing=TeacherForcing(ratio=0.0, decay_start=10, decay_step=0.1)),
        _arm("sigmoid", "Sigmoid on the generator output (Section 3.4).",
             model=replace(REPORT_FINAL.model, output_activation="sigmoid")),
        _arm("identity", "No output activation, as the template.",
             model=replace(REPORT_FINAL.model, output_activation="identity")),
        _arm("prior_standard", "Fixed N(0, I) prior (the lab).",
             model=replace(REPORT_FINAL.model, prior="standard_normal")),
        _arm("prior_learned", "Learned prior p(z_t | x_{t-1}, P_t) (SVG-LP).",
             model=replace(REPORT_FINAL.model, prior="learned")),
    ]
}


@dataclass(frozen=True)
class Arm:
    """One arm of an ablation: a spec and the group it is plotted in."""

    name: str
    spec: ExperimentSpec
    group: str
    keep: tuple[str, ...] = ()  # spec keys a profile must not change (e.g. tuned optim.lr)


@dataclass(frozen=True)
class Ablation:
    name: str
    arms: tuple[Arm, ...]
    reference: str  # the arm the others are compared against
    scientific: str  # the hyperparameter under study (tuning playbook vocabulary)


def _simple(name: str, arm_names: list[str], scientific: str) -> Ablation:
    arms = tuple(Arm(n, SPECS[n], n) for n in arm_names)
    return Ablation(name, arms, arm_names[0], scientific)


def _report_tfr_groups() -> Ablation:
    arms = []
    for tfr in ("tfr_decay", "tfr_off"):
        for kl in ("kl_cyclical", "kl_monotonic", "kl_constant"):
            spec = replace(SPECS[kl], name=f"{tfr}+{kl}",
                           teacher_forcing=SPECS[tfr].teacher_forcing,
                           description=f"{SPECS[tfr].description} {SPECS[kl].description}")
            arms.append(Arm(spec.name, spec, tfr))
    return Ablation("report_tfr_groups", tuple(arms), "tfr_decay+kl_cyclical",
                    "teacher forcing (each group holds the three KL arms)")


def _calibration() -> Ablation:
    """The A/A check of the statistics (``python -m studies.calibration``): the reference
    (``report_final``), an exact copy of it whose random streams are salted
    (``train.replicate``: the same science, other random numbers), which must come out "no
    detectable difference", and a known-worse arm (a tenth of the learning rate, at every
    profile: ``optim.lr_scale``), which must come out "worse"."""
    reference = replace(REPORT_FINAL, name="calibration_reference",
                        description="The report's final model (report_final), unchanged.")
    copy = replace(reference, name="calibration_copy",
                   description="An exact copy of the reference, its random streams salted "
                               "(train.replicate = 1): must not differ.",
                   train=replace(reference.train, replicate=1))
    worse = replace(reference, name="calibration_low_lr",
                    description="The reference at a tenth of its learning rate: must be worse.",
                    optim=replace(reference.optim, lr_scale=0.1))
    return Ablation("calibration", tuple(Arm(s.name, s, s.name) for s in (reference, copy, worse)),
                    reference.name, "none: an A/A copy and a known-worse arm (calibration)")


ABLATIONS: dict[str, Ablation] = {
    a.name: a
    for a in [
        _simple("kl", ["kl_cyclical", "kl_monotonic", "kl_constant"], "KL annealing schedule"),
        _simple("tfr", ["tfr_decay", "tfr_off"], "teacher forcing"),
        _simple("output", ["identity", "sigmoid"], "output activation"),
        _simple("prior", ["prior_standard", "prior_learned"], "prior"),
        _report_tfr_groups(),
        _calibration(),
    ]
}


def list_specs(pattern: str = "*") -> list[str]:
    return sorted(n for n in SPECS if fnmatch.fnmatch(n, pattern))


def get_ablation(name: str) -> Ablation:
    if name not in ABLATIONS:
        raise SpecError(f"unknown ablation {name!r}; valid: {', '.join(ABLATIONS)}")
    return ABLATIONS[name]


def _flatten_toml(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten_toml(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def read_toml(path: str | Path) -> dict[str, Any]:
    """A spec file's contents; a missing or malformed file is a one-line SpecError."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise SpecError(f"{path}: not valid TOML ({err})") from None


def _followed(path: str | Path, chain: tuple[Path, ...]) -> tuple[Path, ...]:
    """``chain`` (the spec files already followed through ``base``) plus ``path``; a file
    that is already in it is a cycle (a file whose base is itself included): one line."""
    here = Path(path).resolve()
    if here in chain:
        loop = " -> ".join(str(p) for p in (*chain[chain.index(here):], here))
        raise SpecError(f"{path}: `base` goes round in a cycle: {loop}")
    return (*chain, here)


def load_toml_spec(path: str | Path, *, _chain: tuple[Path, ...] = ()) -> ExperimentSpec:
    chain = _followed(path, _chain)
    path = Path(path)
    data = read_toml(path)
    base = data.pop("base", None)
    if base is None:
        raise SpecError(f"{path}: needs a top-level `base = \"NAME\"`; registered: "
                        f"{', '.join(SPECS)}")
    name = str(data.pop("name", path.stem))
    data.pop("search", None)  # the tuning search space, read by studies.tuning
    base = str(base)
    base_spec = load_toml_spec(base, _chain=chain) if base.endswith(".toml") else \
        resolve_spec(base)
    overrides = _flatten_toml(data)
    try:
        return apply_overrides(replace(base_spec, name=name), overrides)
    except SpecError as err:
        raise SpecError(f"{path}: {err}") from None


def explicit_keys(name_or_path: str, *, _chain: tuple[Path, ...] = ()) -> frozenset[str]:
    """The keys a ``.toml`` spec (and the ``.toml`` specs it builds on) sets itself: a
    profile's defaults (its learning rate) do not replace them. Registered names set none."""
    if not name_or_path.endswith(".toml"):
        return frozenset()
    chain = _followed(name_or_path, _chain)
    data = read_toml(name_or_path)
    base = str(data.pop("base", ""))
    for key in ("name", "search"):
        data.pop(key, None)
    return frozenset(_flatten_toml(data)) | explicit_keys(base, _chain=chain)


def resolve_spec(name_or_path: str) -> ExperimentSpec:
    """A registered name or a ``.toml`` file; unknown names list the registered ones."""
    if name_or_path.endswith(".toml"):
        return load_toml_spec(name_or_path)
    if name_or_path not in SPECS:
        raise SpecError(f"unknown spec {name_or_path!r}; registered: {', '.join(SPECS)} "
                        "(or a path to a .toml file)")
    return SPECS[name_or_path]


# ---------------------------------------------------------------------------------------------
# Profiles
# ---------------------------------------------------------------------------------------------
ProfileName = Literal["smoke", "cpu", "full"]
PROFILES: tuple[str, ...] = ("smoke", "cpu", "full")


@dataclass(frozen=True)
class Profile:
    """What a profile changes: data size, model width, epochs (and, with the epochs, the time
    axis of epoch-indexed schedules), and for short runs the learning rate. Never the science:
    losses, schedule shapes, protocol; every arm of an ablation gets the same changes."""

    name: str
    synthetic_size: str  # cvae.data.synthetic size
    model: dict[str, int]  # width overrides; empty = the spec's own
    epochs: int | None  # cap; None = the spec's own
    eval_every: int | None
    lr: float | None = None  # None = the spec's own; a spec file or --set optim.lr wins


PROFILE_SETTINGS: dict[str, Profile] = {
    "smoke": Profile("smoke", "smoke",
                     {"frame_dim": 8, "label_dim": 4, "latent_dim": 4, "decoder_dim": 8,
                      "encoder_width": 4},
                     epochs=2, eval_every=1),
    # Sized so that the main job (3 KL arms x 2 seeds, two single-threaded runs at a time)
    # ends within 20 minutes on a 2-core CPU. Measured (kl_monotonic, seed 0, 100 clips):
    # after 6 epochs at the report's lr 3e-4 19.7 dB against a 19.4 dB floor, at 1e-3 20.5 dB,
    # at 2e-3 21.3 dB; 8 epochs at 2e-3 on 75 clips ended at only 19.8 dB, on 100 at 21.6.
    "cpu": Profile("cpu", "cpu",
                   {"frame_dim": 16, "label_dim": 8, "latent_dim": 8, "decoder_dim": 32,
                    "encoder_width": 4},
                   epochs=8, eval_every=2, lr=2e-3),
    "full": Profile("full", "full", {}, epochs=None, eval_every=None),
}


def default_profile(device: str) -> str:
    return "full" if device == "cuda" else "cpu"


def rescale_time(spec: ExperimentSpec, epochs: int,
                 keep: Collection[str] = ()) -> ExperimentSpec:
    """Set ``train.epochs`` and keep every epoch-indexed schedule's shape over the run.

    With s = epochs / spec epochs: the number of KL cycles scales with the run (cycles * s,
    so each keeps its length in epochs, but at least 2 when the spec has several, so a
    cyclical arm never turns into a monotonic one), teacher forcing starts decaying at the
    same fraction of training and decays as fast per fraction (decay_start * s,
    decay_step / s), LR milestones scale by s. Per-iteration KL schedules need nothing: they
    already follow the run's length. A key in ``keep`` (``kl.cycles``,
    ``teacher_forcing.decay_start``, ``teacher_forcing.decay_step``,
    ``lr_schedule.milestones``: chosen by the user) keeps its value.
    """
    if epochs == spec.train.epochs:
        return spec
    s = epochs / spec.train.epochs
    kl = spec.kl
    if isinstance(kl, CyclicalKL) and kl.per == "epoch" and "kl.cycles" not in keep:
        # At least two cycles if the spec has several: one cycle would make it monotonic.
        kl = replace(kl, cycles=max(min(kl.cycles, 2), round(kl.cycles * s)))
    tf = spec.teacher_forcing
    if "teacher_forcing.decay_start" not in keep:
        tf = replace(tf, decay_start=round(tf.decay_start * s))
    if "teacher_forcing.decay_step" not in keep:
        tf = replace(tf, decay_step=min(1.0, tf.decay_step / s))
    lr = spec.lr_schedule
    if "lr_schedule.milestones" not in keep:
        scaled = sorted(max(1, round(m * s)) for m in lr.milestones)
        # Milestones that land on the same epoch each still apply gamma there (as MultiStepLR
        # counts repeated milestones): the template's (2, 5) over 70 epochs become (1, 1) over
        # 8 and the lr still ends at gamma**2. Schedules that never read milestones keep them
        # deduplicated, so their spec hashes (and stored runs) stay as they were.
        lr = replace(lr, milestones=tuple(scaled if lr.kind == "multistep"
                                          else sorted(set(scaled))))
    return replace(spec, kl=kl, teacher_forcing=tf, lr_schedule=lr,
                   train=replace(spec.train, epochs=epochs))


def apply_profile(spec: ExperimentSpec, profile: str, *, epochs: int | None = None,
                  keep: Collection[str] = ()) -> ExperimentSpec:
    """The spec as it runs under ``profile`` (``epochs`` overrides the profile's cap). ``keep``:
    the keys chosen explicitly (``--set``, a spec file, a tuned value): every one of them
    stays as chosen (widths, ``train.epochs``, ``eval.every``, the learning rate, and the
    schedules that ``rescale_time`` would rescale)."""
    if profile not in PROFILE_SETTINGS:
        raise SpecError(f"unknown profile {profile!r}; choose one of: {', '.join(PROFILES)}")
    settings = PROFILE_SETTINGS[profile]
    widths = {k: v for k, v in settings.model.items() if f"model.{k}" not in keep}
    if widths:
        spec = replace(spec, model=replace(spec.model, **widths))
    if settings.lr is not None and "optim.lr" not in keep:
        spec = replace(spec, optim=replace(spec.optim, lr=settings.lr))
    target = epochs if epochs is not None else (
        min(spec.train.epochs, settings.epochs)
        if settings.epochs and "train.epochs" not in keep else spec.train.epochs)
    if target < 1:
        raise SpecError(f"--epochs={target} must be >= 1")
    spec = rescale_time(spec, target, keep)
    if settings.eval_every and "eval.every" not in keep:
        spec = replace(spec, eval=replace(spec.eval, every=min(settings.eval_every, target)))
    return spec


def resolve(spec: str | ExperimentSpec, *, profile: str | None, epochs: int | None = None,
            data: str | None = None, seed: int | None = None,
            overrides: Mapping[str, Any] | None = None,
            keep: Collection[str] = ()) -> ExperimentSpec:
    """The spec as it runs: the one resolver of every command, study, tuning trial and queue
    worker, so that the same choices give the same ``spec_hash`` wherever they are made.

    In this order: the spec (a registered name, a ``.toml`` file or a spec), the user's
    ``overrides`` (``--set``), the ``data`` folder, the ``profile`` with ``epochs`` (``epochs``
    without a profile rescales the spec as it is), the ``seed``. The keys the user chose (the
    overrides, a spec file's own keys, ``keep``: e.g. tuned values) are left as they are by
    the profile (``apply_profile``).
    """
    chosen = set(keep)
    if isinstance(spec, str):
        chosen |= explicit_keys(spec)
        spec = resolve_spec(spec)
    if overrides:
        spec = apply_overrides(spec, overrides)
        chosen |= set(overrides)
    if data is not None:
        spec = replace(spec, data=replace(spec.data, source=data))
    if profile is not None or epochs is not None:
        spec = apply_profile(spec, profile or "full", epochs=epochs, keep=chosen)
    return spec if seed is None else replace(spec, seed=seed)


def synthetic_size(profile: str) -> str:
    return PROFILE_SETTINGS[profile].synthetic_size
