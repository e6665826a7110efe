"""Hyperparameter search with Optuna: the search space, the objective, storages, and what a
finished study leaves behind. The command line is ``studies.tune``.

In the tuning playbook's words (https://github.com/google-research/tuning_playbook): the
*nuisance* hyperparameters searched here are the learning rate and the KL annealing's cycles
and ratio; the *scientific* one (the ablation's arm) is fixed per study; everything else in the
spec is *fixed*.

- Search space: ``optim.lr`` log-uniform in [1e-5, 3e-3]; ``kl.cycles`` (integer, only for a
  cyclical KL) in [1, epochs // 2], so that each cycle spans at least two epochs of the run
  as the profile sizes it; ``kl.ratio`` in [0.1, 1.0] (cyclical and monotonic KL). A spec
  file's ``[search]`` table replaces, adds or removes entries::

      [search]
      "optim.lr" = {low = 1e-5, high = 3e-3, log = true}
      "kl.cycles" = {low = 1, high = 8, int = true}
      "optim.weight_decay" = {low = 0.0, high = 0.1}
      "kl.ratio" = false                  # not searched: keep the spec's value

  Bounds are in the run's own units (``kl.cycles`` counts cycles over the profile's epochs).
- Objective: the final validation PSNR (dB, maximized). Each evaluation is reported with
  ``trial.report(val_psnr, epoch)``; when the pruner says so the hook raises
  ``optuna.TrialPruned`` and the runner ends the MLflow run KILLED. A non-finite loss ends the
  trial FAIL (the reason in the ``stop_reason`` user attribute) and the study goes on.
- MLflow: each trial is one child run (``run_experiment`` with tags ``trial`` and
  ``optuna_study``) under the study's parent run; after the trial its ``trial_state`` tag says
  COMPLETE, PRUNED or FAIL, as Optuna records it.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
import tomllib
from optuna.trial import FrozenTrial, TrialState

from cvae.train import Evaluation, Hooks, NonFiniteLossError
from experiments import tracking
from experiments.data import Data
from experiments.registry import PROFILE_SETTINGS, SPECS, Arm, read_toml, resolve_spec
from experiments.runner import RunContext, run_experiment
from experiments.spec import ExperimentSpec, SpecError, apply_overrides, flatten, spec_hash
from studies.grid import Grid
from studies.results import REPORTS

OBJECTIVE = "val/psnr"
TARGET_NAME = "final val/psnr (dB)"
SAMPLERS: tuple[str, ...] = ("tpe", "qmc", "random")
PRUNERS: tuple[str, ...] = ("median", "hyperband", "none")
FINISHED: tuple[TrialState, ...] = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
EDGE_FRACTION = 0.05  # "on the edge": within 5% of a bound in the sampled (log or linear) scale
_SEARCH_OPTIONS = ("low", "high", "log", "int")


# ---------------------------------------------------------------------------------------------
# Search space
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchParam:
    """One searched spec field: uniform (or log-uniform) in [low, high], integer or float."""

    key: str  # a spec override key, e.g. "optim.lr"
    low: float
    high: float
    log: bool = False
    integer: bool = False

    def suggest(self, trial: optuna.trial.BaseTrial) -> float | int:
        if self.integer:
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)

    def position(self, value: float) -> float:
        """Where ``value`` lies in [low, high] in the sampled scale: 0 at low, 1 at high."""
        if self.log:
            return (math.log(value) - math.log(self.low)) / (math.log(self.high) - math.log(self.low))
        return (value - self.low) / (self.high - self.low)

    def describe(self) -> str:
        kind = "int" if self.integer else "float"
        return f"{self.key} in [{self.low:g}, {self.high:g}] ({kind}{', log' if self.log else ''})"

    def to_dict(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high, "log": self.log, "int": self.integer}


@dataclass(frozen=True)
class SearchSpace:
    params: tuple[SearchParam, ...]
    notes: tuple[str, ...] = ()  # why a default entry is absent ("kl.cycles not searched: ...")

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    def suggest(self, trial: optuna.trial.BaseTrial) -> dict[str, float | int]:
        return {p.key: p.suggest(trial) for p in self.params}

    def to_json(self) -> str:
        return json.dumps({p.key: p.to_dict() for p in self.params}, sort_keys=True)


def default_search_space(spec: ExperimentSpec) -> SearchSpace:
    """The default entries that apply to ``spec`` (already resolved under its profile); an
    entry that cannot change the run (no cycles on a constant KL, no ratio over one epoch)
    is left out with a note."""
    params = [SearchParam("optim.lr", 1e-5, 3e-3, log=True)]
    notes = []
    kind = spec.kl.kind
    if kind == "cyclical":
        high = spec.train.epochs // 2  # each cycle at least two epochs long
        if high >= 2:
            params.append(SearchParam("kl.cycles", 1, high, integer=True))
        else:
            notes.append(f"kl.cycles not searched: {spec.train.epochs} epoch(s) leave room for "
                         "only one cycle of at least two epochs")
    else:
        notes.append(f"kl.cycles not searched: the {kind} KL schedule has no cycles")
    if hasattr(spec.kl, "ratio") and spec.kl.per == "epoch" and spec.train.epochs < 2:
        notes.append("kl.ratio not searched: a per-epoch ramp over 1 epoch has no room (beta "
                     "holds its stop value whatever the ratio)")
    elif hasattr(spec.kl, "ratio"):
        params.append(SearchParam("kl.ratio", 0.1, 1.0))
    else:
        notes.append(f"kl.ratio not searched: the {kind} KL schedule has no ratio")
    return SearchSpace(tuple(params), tuple(notes))


def _numeric_field(spec: ExperimentSpec, key: str) -> Any:
    """The spec's current value for ``key``, checking it is a searchable number."""
    section = key.partition(".")[0]
    if section == "data":
        raise SpecError(f"search {key!r}: data.* cannot be searched (the data is loaded once "
                        "per study)")
    if key in ("seed", "train.epochs"):
        raise SpecError(f"search {key!r}: {key} is fixed for a study, not searched")
    flat = flatten(spec)
    if key not in flat:
        valid = sorted(k for k, v in flat.items() if _is_number(v) and not k.startswith("data."))
        where = f" (not a field of the {spec.kl.kind} KL schedule)" if section == "kl" else ""
        raise SpecError(f"search: unknown key {key!r}{where}; searchable keys: {', '.join(valid)}")
    value = flat[key]
    if not _is_number(value):
        raise SpecError(f"search {key!r}: only numeric fields can be searched "
                        f"(it is {type(value).__name__} {value!r})")
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_search_entry(spec: ExperimentSpec, key: str, entry: Any) -> SearchParam:
    """``{low = 1e-5, high = 3e-3, log = true}`` (or ``int = true``) for ``key``; validated
    against the spec, including the field's own bounds (e.g. kl.ratio in (0, 1])."""
    current = _numeric_field(spec, key)
    if not isinstance(entry, dict):
        raise SpecError(f"search {key!r}: expected a table like {{low = 1e-5, high = 3e-3, "
                        f"log = true}} or false, got {entry!r}")
    unknown = sorted(set(entry) - set(_SEARCH_OPTIONS))
    if unknown:
        raise SpecError(f"search {key!r}: unknown option(s) {', '.join(unknown)}; valid: "
                        f"{', '.join(_SEARCH_OPTIONS)}")
    if "low" not in entry or "high" not in entry:
        raise SpecError(f"search {key!r}: needs both low and high")
    low, high = entry["low"], entry["high"]
    log, integer = entry.get("log", False), entry.get("int", isinstance(current, int))
    if not (_is_number(low) and _is_number(high)):
        raise SpecError(f"search {key!r}: low and high must be numbers, got {low!r}, {high!r}")
    if not (isinstance(log, bool) and isinstance(integer, bool)):
        raise SpecError(f"search {key!r}: log and int must be true or false")
    if isinstance(current, int) and not integer:
        raise SpecError(f"search {key!r}: {key} is an integer field; use int = true")
    if integer and not (float(low).is_integer() and float(high).is_integer()):
        raise SpecError(f"search {key!r}: int = true needs integer bounds, got {low}, {high}")
    if not low < high:
        raise SpecError(f"search {key!r}: low={low} must be < high={high}")
    if log and low <= 0:
        raise SpecError(f"search {key!r}: log = true needs low > 0, got {low}")
    for bound in (low, high):
        try:
            apply_overrides(spec, {key: int(bound) if integer else float(bound)})
        except SpecError as err:
            raise SpecError(f"search {key!r}: bound {bound} is invalid: {err}") from None
    return SearchParam(key, float(low), float(high), log=log, integer=integer)


def search_space(spec: ExperimentSpec, table: dict[str, Any] | None = None) -> SearchSpace:
    """The default space for ``spec`` with a ``[search]`` table's entries applied: a table
    replaces or adds an entry, ``false`` removes one."""
    space = default_search_space(spec)
    if not table:
        return space
    params = {p.key: p for p in space.params}
    notes = list(space.notes)
    for key, entry in table.items():
        if entry is False:
            _numeric_field(spec, key)
            params.pop(key, None)
            notes.append(f"{key} not searched: removed by the spec's [search] table")
            continue
        params[key] = parse_search_entry(spec, key, entry)
        notes = [n for n in notes if not n.startswith(f"{key} ")]
    if not params:
        raise SpecError("search: the [search] table leaves nothing to search")
    return SearchSpace(tuple(params.values()), tuple(notes))


# ---------------------------------------------------------------------------------------------
# Spec files with a [search] table
# ---------------------------------------------------------------------------------------------
def load_spec(name_or_path: str) -> tuple[ExperimentSpec, dict[str, Any]]:
    """A registered spec or a ``.toml`` spec file, and the file's ``[search]`` table (or {}).

    ``experiments.registry.load_toml_spec`` ignores the ``[search]`` table, so both read the
    rest of the file the same way.
    """
    if not name_or_path.endswith(".toml"):
        return resolve_spec(name_or_path), {}
    table = read_toml(name_or_path).get("search", {})
    if not isinstance(table, dict):
        raise SpecError(f"{name_or_path}: `search` must be a table ([search])")
    return resolve_spec(name_or_path), table


def registered_root(name_or_path: str) -> str:
    """The registered spec a name or a chain of ``base = ...`` spec files starts from."""
    seen = set()
    while name_or_path.endswith(".toml"):
        if name_or_path in seen:
            raise SpecError(f"spec file {name_or_path}: its `base` chain loops")
        seen.add(name_or_path)
        base = tomllib.loads(Path(name_or_path).read_text()).get("base")
        if base is None:
            raise SpecError(f"{name_or_path}: needs a top-level `base = \"NAME\"`")
        name_or_path = str(base)
    return name_or_path


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SpecError(f"cannot write {value} to a TOML spec")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise SpecError(f"cannot write {type(value).__name__} {value!r} to a TOML spec")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def toml_text(data: dict[str, Any], comments: dict[str, str] | None = None) -> str:
    """A nested dict of scalars and arrays as TOML: top-level keys, then one table per
    section; ``comments`` maps a dotted key to an end-of-line comment."""
    comments = comments or {}
    lines: list[str] = []

    def emit(key: str, dotted: str, value: Any) -> None:
        note = f"  # {comments[dotted]}" if dotted in comments else ""
        lines.append(f"{_toml_key(key)} = {_toml_value(value)}{note}")

    for key, value in data.items():
        if not isinstance(value, dict):
            emit(key, key, value)
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"\n[{_toml_key(key)}]")
            for sub, inner in value.items():
                if isinstance(inner, dict):
                    lines.append(f"{_toml_key(sub)} = {{" + ", ".join(
                        f"{_toml_key(k)} = {_toml_value(v)}" for k, v in inner.items()) + "}")
                else:
                    emit(sub, f"{key}.{sub}", inner)
    return "\n".join(lines) + "\n"


def best_spec_toml(*, root: str, spec: ExperimentSpec, profile: str, tuned: Sequence[str],
                   header: Sequence[str] = ()) -> str:
    """A spec file that ``python -m experiments run FILE --profile P --epochs E`` resolves to
    exactly ``spec`` (same ``spec_hash``): ``base = root`` and every field that differs from
    the registered ``root`` spec, except those the profile sets again (model widths, eval
    interval). ``train.epochs`` is written, so the schedules' time axis is the tuned one."""
    profile_keys = {f"model.{k}" for k in PROFILE_SETTINGS[profile].model}
    if PROFILE_SETTINGS[profile].eval_every:
        profile_keys.add("eval.every")
    before, after = flatten(SPECS[root]), flatten(spec)
    changed = {k: v for k, v in after.items()
               if k not in ("name", "description", "seed", *profile_keys)
               and (before.get(k) != v or k in tuned or k == "train.epochs")}
    if "kl.kind" in changed or any(k.startswith("kl.") for k in tuned):
        changed.setdefault("kl.kind", after["kl.kind"])
    data: dict[str, Any] = {"base": root, "name": spec.name}
    for key, value in sorted(changed.items(), key=lambda kv: (kv[0] != "kl.kind", kv[0])):
        section, _, name = key.partition(".")
        data.setdefault(section, {})[name] = value
    comments = {k: "tuned" for k in tuned}
    comments["train.epochs"] = "the tuned run's length, the time axis of the schedules"
    return "".join(f"# {line}\n" for line in header) + toml_text(data, comments)


# ---------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------
class PruningHooks(Hooks):
    """Reports each evaluation's PSNR to the trial and raises ``optuna.TrialPruned`` when the
    pruner says so (never at the final epoch: that trial is finished anyway)."""

    def __init__(self, trial: optuna.trial.BaseTrial, epochs: int):
        self.trial, self.epochs = trial, epochs

    def on_evaluation(self, epoch: int, evaluation: Evaluation) -> None:
        psnr = evaluation.psnr
        self.trial.report(psnr, epoch)
        if epoch < self.epochs - 1 and self.trial.should_prune():
            self.trial.set_user_attr("pruned_at_epoch", epoch)
            raise optuna.TrialPruned(f"pruned at epoch {epoch} with {OBJECTIVE} {psnr:.2f} dB")


class Objective:
    """``objective(trial) -> final val/psnr`` of ``base`` with the trial's suggestions applied,
    trained and recorded by the runner as a child run of the study's parent run."""

    def __init__(self, base: ExperimentSpec, space: SearchSpace, *, study_name: str,
                 context: RunContext, device: str = "cpu", data: Data | None = None,
                 progress: bool | None = False):
        self.base, self.space, self.study_name = base, space, study_name
        self.context, self.device, self.data, self.progress = context, device, data, progress

    def spec_for(self, trial: optuna.trial.BaseTrial) -> ExperimentSpec:
        return apply_overrides(self.base, self.space.suggest(trial))

    def __call__(self, trial: optuna.trial.BaseTrial) -> float:
        spec = self.spec_for(trial)
        trial.set_user_attr("spec_hash", spec_hash(spec))
        experiment_id = self.context.experiment_id or \
            tracking.get_or_create_experiment(self.context.study)
        context = replace(self.context, experiment_id=experiment_id, extra_tags={
            **self.context.extra_tags, "trial": str(trial.number),
            "optuna_study": self.study_name},
            # Three digits: the runs table sorted by name lists trials in order.
            label=f"{self.context.arm or spec.name}-trial{trial.number:03d}")
        try:
            outcome = run_experiment(spec, context=context, device=self.device, data=self.data,
                                     progress=self.progress,
                                     hooks=PruningHooks(trial, spec.train.epochs))
        except optuna.TrialPruned:
            self._mark(trial, experiment_id, spec, None, "PRUNED")
            raise
        except NonFiniteLossError as err:
            trial.set_user_attr("stop_reason", str(err))
            self._mark(trial, experiment_id, spec, None, "FAIL")
            raise
        except KeyboardInterrupt:
            # Counted as not run when the study resumes; its MLflow run resumes from the
            # checkpoint when the retry (same parameters, same spec_hash) comes round.
            trial.set_user_attr("interrupted", True)
            self._mark(trial, experiment_id, spec, None, "FAIL")
            raise
        except Exception as err:
            trial.set_user_attr("stop_reason", tracking.first_line(err, with_type=True))
            self._mark(trial, experiment_id, spec, None, "FAIL")
            raise
        value = float(outcome.metrics.get(OBJECTIVE, math.nan))
        if not math.isfinite(value):
            trial.set_user_attr("stop_reason", f"{OBJECTIVE} is {value}")
            self._mark(trial, experiment_id, spec, outcome.run_id, "FAIL")
            return value  # Optuna records a non-finite value as FAIL
        self._mark(trial, experiment_id, spec, outcome.run_id, "COMPLETE")
        return value

    def _mark(self, trial: optuna.trial.BaseTrial, experiment_id: str, spec: ExperimentSpec,
              run_id: str | None, state: str) -> None:
        """Tag the trial's MLflow run with its Optuna state (and the trial number, which a
        retried trial changes); remember the run id on the trial, and on a tracking server
        the run's page (``mlflow_run_url``)."""
        from mlflow.tracking import MlflowClient

        try:
            if run_id is None:  # the runner raised: its run is the newest of this spec + seed
                runs = tracking.find_runs(experiment_id, spec_hash=spec_hash(spec),
                                          seed=spec.seed)
                if not runs:
                    return
                run_id = runs[0].info.run_id
            client = MlflowClient()
            client.set_tag(run_id, "trial_state", state)
            client.set_tag(run_id, "trial", str(trial.number))
            trial.set_user_attr("mlflow_run_id", run_id)
            url = tracking.run_url(experiment_id, run_id)  # a server: a link in the dashboard
            if url is not None:
                trial.set_user_attr("mlflow_run_url", url)
        except Exception as err:  # noqa: BLE001 (a store error must not hide the trial's outcome)
            print(f"warning: could not tag the MLflow run of trial {trial.number}: "
                  f"{tracking.first_line(err)}")


# ---------------------------------------------------------------------------------------------
# Sampler, pruner, study
# ---------------------------------------------------------------------------------------------
def sampler_seed(seed: int, *, worker: int = 0, existing_trials: int = 0) -> int:
    """A sampler seed per (study seed, worker, trials already in the study): workers and a
    resumed study draw fresh points instead of repeating the first ones."""
    import numpy as np

    if worker == 0 and existing_trials == 0:
        return seed
    return int(np.random.SeedSequence([seed, worker, existing_trials]).generate_state(1)[0])


def make_sampler(name: str, *, seed: int, n_trials: int, worker: int = 0,
                 existing_trials: int = 0) -> optuna.samplers.BaseSampler:
    """tpe (multivariate, constant liar: the Optuna 5 defaults), qmc (scrambled Sobol; its
    sequence is shared through the storage, so every worker uses the same seed) or random."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "qmc":
            return optuna.samplers.QMCSampler(seed=seed, scramble=True)
        seed = sampler_seed(seed, worker=worker, existing_trials=existing_trials)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "tpe":
            # Small budgets: a third of the trials (3 to 10) random before TPE takes over.
            return optuna.samplers.TPESampler(seed=seed,
                                              n_startup_trials=min(10, max(3, n_trials // 3)))
    raise SpecError(f"--sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")


def make_pruner(name: str, spec: ExperimentSpec) -> optuna.pruners.BasePruner:
    """median: prune below the median of earlier trials at the same epoch, after 3 trials
    and a quarter of the epochs; hyperband: from one evaluation interval to the whole run."""
    epochs, every = spec.train.epochs, spec.eval.every
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=epochs // 4)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=every, max_resource=epochs,
                                              reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise SpecError(f"--pruner {name!r}; choose one of: {', '.join(PRUNERS)}")


def study_identity(base: ExperimentSpec, space: SearchSpace, profile: str) -> dict[str, str]:
    """What a study is about; resuming it with anything else is refused."""
    return {"spec": base.name, "spec_hash": spec_hash(base), "profile": profile,
            "epochs": str(base.train.epochs), "search_space": space.to_json(),
            "objective": f"{OBJECTIVE} (maximize)"}


def open_study(storage: optuna.storages.BaseStorage, name: str, *,
               sampler: optuna.samplers.BaseSampler, pruner: optuna.pruners.BasePruner,
               identity: dict[str, str] | None = None) -> optuna.Study:
    """Create the study or load it (resume); a loaded one must match ``identity``."""
    try:
        study = optuna.create_study(storage=storage, study_name=name, sampler=sampler,
                                    pruner=pruner, direction="maximize", load_if_exists=True)
    except Exception as err:  # noqa: BLE001 (any storage error becomes one line)
        raise tracking.TrackingError(f"cannot open Optuna study {name!r}: "
                                     f"{tracking.first_line(err)}") from None
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise SpecError(f"Optuna study {name!r} exists and minimizes; use another --study-name")
    if study.metric_names != [OBJECTIVE]:  # the dashboard's name for the value, not "Objective 0"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([OBJECTIVE])
    if identity is not None:
        attrs = study.user_attrs
        for key, value in identity.items():
            if key in attrs and attrs[key] != value:
                raise SpecError(f"Optuna study {name!r} exists with {key}={attrs[key]} (now "
                                f"{value}); resume it unchanged or use another --study-name")
        for key, value in identity.items():
            if key not in attrs:
                study.set_user_attr(key, value)
    return study


@dataclass
class Plan:
    """How many trials are done and how many this invocation runs (``to_run``)."""

    to_run: int
    done: int
    retried: list[int] = field(default_factory=list)


def interrupted(trial: FrozenTrial) -> bool:
    """A trial stopped by Ctrl-C/SIGTERM: not counted as run; its retry resumes its run."""
    return trial.state == TrialState.FAIL and bool(trial.user_attrs.get("interrupted"))


def plan_trials(study: optuna.Study, n_trials: int) -> Plan:
    """``n_trials`` is the study's total: a resumed study runs only what is missing. Trials
    that were interrupted (Ctrl-C) do not count, and are enqueued again with the same
    parameters, so their MLflow runs resume from the last checkpoint."""
    trials = study.get_trials(deepcopy=False)
    stopped = [t for t in trials if interrupted(t)]
    done = sum(t.state in FINISHED for t in trials) - len(stopped)
    retried_already = {t.user_attrs.get("retry_of") for t in trials}
    to_retry = [t for t in stopped if t.number not in retried_already][:max(0, n_trials - done)]
    for t in to_retry:
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
    return Plan(to_run=max(0, n_trials - done), done=done, retried=[t.number for t in to_retry])


def format_params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in params.items())


def print_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """One line per finished trial (Optuna's own log lines are turned down)."""
    state = trial.state.name
    if trial.state == TrialState.COMPLETE:
        what = f"{OBJECTIVE} {trial.value:.2f} dB"
    elif trial.state == TrialState.PRUNED:
        epoch = trial.user_attrs.get("pruned_at_epoch", trial.last_step)
        what = f"at epoch {epoch}"
    else:
        what = trial.user_attrs.get("stop_reason", "interrupted"
                                    if trial.user_attrs.get("interrupted") else "")
    try:
        best = f"; best: trial {study.best_trial.number} ({study.best_value:.2f} dB)"
    except ValueError:
        best = ""
    print(f"[{study.study_name}] trial {trial.number} {state} {what}  "
          f"{format_params(trial.params)}{best}", flush=True)


# ---------------------------------------------------------------------------------------------
# What a study leaves: best point, edge check, plots
# ---------------------------------------------------------------------------------------------
def counts(study: optuna.Study) -> dict[str, int]:
    trials = study.get_trials(deepcopy=False)
    return {state.name: sum(t.state == state for t in trials) for state in
            (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)}


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no COMPLETE trial
        return None


def edge_report(space: SearchSpace, params: dict[str, Any]) -> list[str]:
    """One line per searched parameter whose best value lies within 5% of a bound (in the
    sampled scale): a sign that the range should move or widen."""
    lines = []
    for p in space.params:
        if p.key not in params:
            continue
        position = p.position(float(params[p.key]))
        scale = "log scale" if p.log else "linear scale"
        if position <= EDGE_FRACTION:
            lines.append(f"{p.key}={params[p.key]:.4g} is at the lower edge of "
                         f"[{p.low:g}, {p.high:g}] ({position:.0%} in {scale})")
        elif position >= 1 - EDGE_FRACTION:
            lines.append(f"{p.key}={params[p.key]:.4g} is at the upper edge of "
                         f"[{p.low:g}, {p.high:g}] ({position:.0%} in {scale})")
    return lines


def _save(axes: Any, path: Path, title: str, *, integer_x: bool = False,
          integer_params: Sequence[str] = (), floor: float | None = None) -> Path:
    """``title`` as the figure's one title (Optuna's own axes titles removed), readable ticks
    (integer trial/epoch axes; log axes without crowded minor labels), ``floor`` (dB) drawn
    on each of ``axes`` (pass it where their y axis is val/psnr), then a PNG at 120 dpi."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib import ticker

    flat = list(np.ravel(axes)) if isinstance(axes, np.ndarray) else [axes]
    for ax in flat:
        for loc in ("left", "center", "right"):  # importances: Optuna's title is on the left
            ax.set_title("", loc=loc)
        if integer_x or ax.get_xlabel() in integer_params:
            ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        if ax.get_xscale() == "log":
            low, high = ax.get_xlim()
            if high < 20 * low:  # within about a decade: a few plain ticks, not minor labels
                ax.xaxis.set_major_locator(ticker.MaxNLocator(nbins=4))
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:.1e}"))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            ax.tick_params(axis="x", labelrotation=30)
    fig = flat[0].figure
    for ax in fig.axes:  # the slice plot's colour bar counts trials
        if ax.get_ylabel() == "Trial":
            ax.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    width, height = fig.get_size_inches()
    if width < 8:
        fig.set_size_inches(8, height)
    if floor is not None:
        _draw_floor(flat, floor)
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _draw_floor(axes: list[Any], floor: float) -> None:
    """The copy-first-frame floor as a dashed line on each of ``axes``, named in a legend
    off the data: beside a single axes (with its existing entries), below a row of them
    (the slice plot: under their tick labels)."""
    label = f"copy first frame ({floor:.2f} dB)"
    for ax in axes:
        line = ax.axhline(floor, color="0.35", ls=(0, (4, 2)), lw=1.2, label=label)
    if len(axes) == 1:
        axes[0].legend(bbox_to_anchor=(1.02, 1), loc="upper left", borderaxespad=0.0)
        return
    fig = axes[0].figure
    fig.canvas.draw()  # lays out the tick labels, so that their extent is known
    to_figure = fig.transFigure.inverted()
    bottom = min(ax.get_tightbbox().transformed(to_figure).y0 for ax in axes)
    fig.legend(handles=[line], loc="upper center", bbox_to_anchor=(0.5, bottom),
               frameon=False)


# Optuna draws importances from 2 complete trials, but its forest (fANOVA) fitted to so few
# points gives a ranking that means nothing, and a bar chart makes it look like a finding.
MIN_TRIALS_FOR_IMPORTANCE = 5


def write_plots(study: optuna.Study, out_dir: Path, *,
                floor: float | None = None) -> tuple[list[Path], list[str]]:
    """Optimization history, intermediate values (the pruned curves), parameter importances
    and slice plots as PNGs (``optuna.visualization.matplotlib``); notes for those skipped.
    ``floor`` (dB: the copy-first-frame PSNR, ``val/psnr_copy_first``) is drawn on every
    plot whose y axis is val/psnr."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    out_dir.mkdir(parents=True, exist_ok=True)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    c = counts(study)
    summary = (f"{len(study.trials)} trials: {c['COMPLETE']} complete, {c['PRUNED']} pruned, "
               f"{c['FAIL']} failed")
    name = study.study_name
    written, notes = [], []
    if not complete:
        return written, [f"no plots: no trial of {name} completed"]
    with warnings.catch_warnings(), plt.rc_context({"axes.titlesize": 11, "axes.labelsize": 10}):
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = ovm.plot_optimization_history(study, target_name=TARGET_NAME)
        ax.set_ylabel(TARGET_NAME)
        written.append(_save(ax, out_dir / "optimization_history.png",
                             f"{name}: {OBJECTIVE} per trial (maximized) - {summary}",
                             integer_x=True, floor=floor))
        if any(t.intermediate_values for t in study.trials):
            ax = ovm.plot_intermediate_values(study)
            ax.set_xlabel("epoch")
            ax.set_ylabel(f"{OBJECTIVE} (dB) at each evaluation")
            written.append(_save(ax, out_dir / "intermediate_values.png",
                                 f"{name}: {OBJECTIVE} reported per epoch (pruned trials stop "
                                 "early)", integer_x=True, floor=floor))
        if len(complete) >= MIN_TRIALS_FOR_IMPORTANCE:
            try:
                ax = ovm.plot_param_importances(study, target_name=TARGET_NAME)
                ax.get_legend().remove()  # one series, named in the title; it hid the bars
                written.append(_save(ax, out_dir / "param_importances.png",
                                     f"{name}: hyperparameter importance for {OBJECTIVE} "
                                     f"({len(complete)} complete trials)"))
            except (RuntimeError, ValueError, ZeroDivisionError) as err:
                plt.close("all")
                notes.append(f"parameter importances skipped: {tracking.first_line(err)}")
        else:
            notes.append("parameter importances skipped: they need at least "
                         f"{MIN_TRIALS_FOR_IMPORTANCE} complete trials ({len(complete)} so far)")
        integer_params = [key for key, d in complete[-1].distributions.items()
                          if isinstance(d, optuna.distributions.IntDistribution)]
        axes = ovm.plot_slice(study, target_name=TARGET_NAME)
        for ax in (list(axes.ravel()) if hasattr(axes, "ravel") else [axes]):
            for points in ax.collections:  # the colour map starts at white: outline the dots
                points.set_edgecolor("0.3")
                points.set_linewidth(0.6)
        written.append(_save(axes, out_dir / "slice.png",
                             f"{name}: {OBJECTIVE} against each searched parameter "
                             "(colour: trial number)", integer_params=integer_params,
                             floor=floor))
    return written, notes


def copy_first_floor(client: Any, parent_run_id: str) -> float | None:
    """The copy-first-frame floor (dB) its trials' runs logged: the line the plots draw (the
    trials share the data, so any one of them says it)."""
    parent = client.get_run(parent_run_id)
    query = tracking.filter_string({"tags.mlflow.parentRunId": parent_run_id})
    for run in client.search_runs([parent.info.experiment_id], filter_string=query,
                                  max_results=20):
        if "val/psnr_copy_first" in run.data.metrics:
            return float(run.data.metrics["val/psnr_copy_first"])
    return None


def write_report_files(study: optuna.Study, out_dir: Path, *,
                       floor: float | None = None) -> tuple[list[Path], list[str]]:
    """The plots (``write_plots``) and ``trials.csv``: what a tuning report draws from the
    Optuna study alone."""
    files, notes = write_plots(study, out_dir, floor=floor)
    table = study.trials_dataframe()
    if len(table):
        table.to_csv(out_dir / "trials.csv", index=False)
        files.append(out_dir / "trials.csv")
    return files, notes


def redraw_report(client: Any, parent: Any, *, out_root: Path | None = None
                  ) -> tuple[Path, list[Path], list[str]]:
    """A tuning study's plots and ``trials.csv`` redrawn from its Optuna storage (its parent
    run's ``optuna_storage`` and ``optuna_study`` tags) and logged to the parent under
    ``tuning/``; ``best_spec.toml`` stays as ``studies.tune`` wrote it. Returns the folder,
    its files and notes. A storage that is gone or whose password the tag masks is a
    one-line ``SpecError``."""
    from studies import storage as storages

    tags = parent.data.tags
    name, url = tags.get("optuna_study", ""), tags.get("optuna_storage", "")
    where = f"tuning study {name!r} (MLflow parent run {parent.info.run_id})"
    if not name or not url:
        raise SpecError(f"{where} names no Optuna storage: rerun its studies.tune command")
    if "***" in url:
        raise SpecError(f"{where}: its storage {url} needs a password, which is not "
                        "recorded; rerun its studies.tune command with --storage")
    path = storages.storage_file(url)
    if path is not None and not path.is_file():
        raise SpecError(f"{where}: its storage {path} is gone")
    with storages.storage_errors(url):
        study = optuna.load_study(study_name=name, storage=storages.open_storage(url))
    out = (out_root if out_root is not None else REPORTS) / name
    files, notes = write_report_files(study, out,
                                      floor=copy_first_floor(client, parent.info.run_id))
    for file in files:
        client.log_artifact(parent.info.run_id, str(file), "tuning")
    return out, files, notes


# ---------------------------------------------------------------------------------------------
# One study's job, shared by the command's process and its worker processes
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Search:
    """How a study searches: its space, sampler (and the sampler's seed), pruner, budget."""

    space: SearchSpace
    sampler: str = "tpe"
    pruner: str = "median"
    seed: int = 0
    n_trials: int = 20
    timeout: float | None = None  # seconds after which a process starts no trial


@dataclass
class StudyJob:
    """One tuning study: a one-arm ``Grid`` (the spec as it runs, its profile, its MLflow
    experiment) plus its search; what every process taking its trials needs."""

    study_name: str  # the Optuna study
    grid: Grid
    search: Search
    storage: str
    device: str
    argv: tuple[str, ...] = ()  # the command line of a --worker that joins the study
    experiment_id: str = ""
    parent_run_id: str = ""

    @property
    def arm(self) -> Arm:
        return self.grid.chosen[0]

    @property
    def base(self) -> ExperimentSpec:
        """The spec every trial starts from (profile-resolved)."""
        return self.grid.runs[0].spec


def job_objective(job: StudyJob, data: Data | None, *, progress: bool | None) -> Objective:
    context = job.grid.context(job.arm, experiment_id=job.experiment_id or None,
                              parent_run_id=job.parent_run_id or None)
    return Objective(job.base, job.search.space, study_name=job.study_name, context=context,
                     device=job.device, data=data, progress=progress)
