"""Specs, registry, overrides, TOML specs and profiles: pure and fast."""

from dataclasses import replace

import pytest

from experiments.registry import (
    ABLATIONS,
    LAB_TEMPLATE,
    REPORT_FINAL,
    SPECS,
    apply_profile,
    explicit_keys,
    list_specs,
    resolve,
    resolve_spec,
)
from experiments.spec import (
    ConstantKL,
    CyclicalKL,
    SpecError,
    apply_overrides,
    flatten,
    from_json,
    parse_set,
    spec_hash,
    to_json,
)


def test_report_arms_carry_the_reports_settings():
    assert SPECS["kl_cyclical"].kl == CyclicalKL(cycles=40, ratio=0.5, start=0.1, stop=1.0)
    assert SPECS["kl_monotonic"].kl.kind == "monotonic" and SPECS["kl_monotonic"].kl.ratio == 0.5
    assert SPECS["kl_constant"].kl.kind == "constant" and SPECS["kl_constant"].kl.value == 1.0
    assert SPECS["tfr_off"].teacher_forcing.ratio == 0.0
    tfr = SPECS["tfr_decay"].teacher_forcing
    assert (tfr.ratio, tfr.decay_start, tfr.decay_step) == (1.0, 10, 0.1)
    final = REPORT_FINAL
    assert (final.optim.kind, final.optim.lr, final.lr_schedule.kind, final.train.epochs,
            final.train.batch_size, final.teacher_forcing.ratio,
            final.model.output_activation) == ("adamw", 3e-4, "cosine", 400, 2, 0.0, "sigmoid")
    lab = LAB_TEMPLATE
    assert (lab.optim.kind, lab.optim.lr, lab.lr_schedule.milestones, lab.train.epochs,
            lab.kl.cycles, lab.kl.ratio, lab.model.output_activation) == (
        "adam", 1e-3, (2, 5), 70, 10, 1.0, "identity")


def test_ablations_list_their_arms_and_groups():
    assert [a.name for a in ABLATIONS["kl"].arms] == ["kl_cyclical", "kl_monotonic", "kl_constant"]
    groups = ABLATIONS["report_tfr_groups"]
    assert len(groups.arms) == 6
    assert {a.group for a in groups.arms} == {"tfr_decay", "tfr_off"}
    off = [a for a in groups.arms if a.group == "tfr_off"]
    assert all(a.spec.teacher_forcing.ratio == 0.0 for a in off)
    assert {a.spec.kl.kind for a in off} == {"cyclical", "monotonic", "constant"}


def test_hash_excludes_seed_and_name_but_not_science():
    base = SPECS["kl_cyclical"]
    assert spec_hash(base) == spec_hash(replace(base, seed=7, name="other"))
    assert spec_hash(base) != spec_hash(apply_overrides(base, {"optim.lr": "1e-4"}))
    assert spec_hash(base) == spec_hash(SPECS["kl_cyclical"])  # stable across calls


def test_precision_changes_the_hash_only_when_not_the_default():
    """train.precision arrived after runs were stored: fp32 specs keep the hashes they had
    before it (measured on the commit before the key), so studies still find their runs;
    bf16 is another computation and gets its own hash."""
    base = SPECS["kl_cyclical"]
    assert base.train.precision == "fp32"
    assert spec_hash(base) == "af3cd956cb83"
    assert spec_hash(apply_profile(base, "cpu")) == "ed1c977bb5f8"
    bf16 = apply_overrides(base, {"train.precision": "bf16"})
    assert bf16.train.precision == "bf16" and spec_hash(bf16) != spec_hash(base)
    assert flatten(bf16)["train.precision"] == "bf16"


def test_reduce_changes_the_hash_only_where_it_averages_several_samples():
    """eval.reduce arrived after runs were stored: where it means what came before (one
    sample, the prior mean, or "best", the old best-of-N), specs keep their hashes; the mean
    of several samples is another metric and gets its own."""
    base = SPECS["kl_cyclical"]
    assert base.eval.samples == 1
    for reduce in ("mean", "best"):
        one = apply_overrides(base, {"eval.reduce": reduce})
        assert spec_hash(one) == "af3cd956cb83"
        prior_mean = apply_overrides(base, {"eval.reduce": reduce, "eval.samples": "4",
                                            "eval.latent": "prior_mean"})
        assert spec_hash(prior_mean) == spec_hash(apply_overrides(
            base, {"eval.samples": "4", "eval.latent": "prior_mean", "eval.reduce": "best"}))
    best_of_4 = apply_overrides(base, {"eval.samples": "4", "eval.reduce": "best"})
    mean_of_4 = apply_overrides(base, {"eval.samples": "4", "eval.reduce": "mean"})
    assert spec_hash(best_of_4) == "9869d918e6cf"  # eval.samples=4 before eval.reduce existed
    assert spec_hash(mean_of_4) not in (spec_hash(best_of_4), spec_hash(base))
    assert flatten(mean_of_4)["eval.reduce"] == "mean"


def test_every_profile_evaluates_one_prior_sample():
    """The default evaluation, chosen from the measured noise (README, Evaluation noise): one
    prior sample at every profile, the lab's protocol, for lab_template and every arm."""
    for name, spec in SPECS.items():
        for profile in ("smoke", "cpu", "full"):
            evaluation = apply_profile(spec, profile).eval
            assert (evaluation.latent, evaluation.samples) == ("prior_sample", 1), (name, profile)


def test_json_round_trip_and_flatten():
    for spec in SPECS.values():
        assert from_json(to_json(spec)) == spec
    flat = flatten(SPECS["kl_monotonic"])
    assert flat["kl.kind"] == "monotonic" and flat["optim.lr"] == 3e-4
    assert "kl.cycles" not in flat  # a conditional parameter lives on its variant only


@pytest.mark.parametrize("key, value, message", [
    ("optim.lr", "-1", "optim.lr=-1.0 must be > 0"),
    ("optim.lr", "0", "must be > 0"),
    ("kl.ratio", "0", "kl.ratio=0.0 must be in (0, 1]"),
    ("kl.ratio", "1.5", "must be in (0, 1]"),
    ("kl.cycles", "0", "kl.cycles=0 must be >= 1"),
    ("train.epochs", "0", "train.epochs=0 must be >= 1"),
    ("teacher_forcing.ratio", "2", "must be in [0, 1]"),
    ("optim.kind", "sgd", "choose one of: adam, adamw"),
    ("train.precision", "fp16", "choose one of: fp32, bf16"),
    ("eval.reduce", "median", "eval.reduce='median' is not valid; choose one of: mean, best"),
    ("train.epochs", "ten", "is not an integer"),
    ("optim.lr", "fast", "is not a number"),
    ("optim.lrr", "1", "unknown key 'optim.lrr'; valid keys:"),
    # non-finite numbers, anywhere (nan passes `weight_decay < 0`; inf passes `lr > 0`)
    ("optim.lr", "inf", "optim.lr=inf must be a finite number"),
    ("optim.weight_decay", "nan", "optim.weight_decay=nan must be a finite number"),
    ("train.grad_clip", "nan", "train.grad_clip=nan must be a finite number"),
    ("lr_schedule.gamma", "-inf", "lr_schedule.gamma=-inf must be a finite number"),
    ("kl.start", "nan", "kl.start=nan must be a finite number"),
    ("kl.stop", "inf", "kl.stop=inf must be a finite number"),
    ("teacher_forcing.ratio", "nan", "teacher_forcing.ratio=nan must be a finite number"),
    ("teacher_forcing.decay_step", "NaN", "teacher_forcing.decay_step=nan must be a finite"),
])
def test_bad_overrides_fail_with_one_line(key, value, message):
    with pytest.raises(SpecError) as info:
        apply_overrides(SPECS["kl_cyclical"], {key: value})
    assert message in str(info.value) and "\n" not in str(info.value)


def test_specs_built_in_python_reject_non_finite_numbers():
    """Registered specs are built with ``replace``, not through overrides: the spec itself
    checks every number, nested KL and teacher-forcing variants included."""
    nan, inf = float("nan"), float("inf")
    spec = SPECS["kl_cyclical"]
    with pytest.raises(SpecError, match=r"^optim.weight_decay=nan must be a finite number$"):
        replace(spec, optim=replace(spec.optim, weight_decay=nan))
    with pytest.raises(SpecError, match=r"^kl.value=inf must be a finite number$"):
        replace(spec, kl=ConstantKL(value=inf))
    with pytest.raises(SpecError, match=r"^kl.start=nan"):
        replace(spec, kl=replace(spec.kl, start=nan, stop=1.0))


def test_toml_number_must_be_finite(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('base = "kl_cyclical"\n[optim]\nlr = inf\n')
    with pytest.raises(SpecError, match=r"mine.toml: optim.lr=inf must be a finite number"):
        resolve_spec(str(path))


def test_toml_base_cycles_are_one_line_errors(tmp_path):
    itself = tmp_path / "itself.toml"
    itself.write_text(f'base = "{itself}"\n')
    first, second = tmp_path / "first.toml", tmp_path / "second.toml"
    first.write_text(f'base = "{second}"\n[optim]\nlr = 1e-4\n')
    second.write_text(f'base = "{first}"\n')
    for path, loop in ((itself, [itself, itself]), (first, [first, second, first])):
        for read in (resolve_spec, explicit_keys):  # both follow `base` (a RecursionError)
            with pytest.raises(SpecError) as info:
                read(str(path))
            assert f"cycle: {' -> '.join(map(str, loop))}" in str(info.value)
            assert "\n" not in str(info.value)
    # A chain that only shares a base twice is not a cycle.
    leaf = tmp_path / "leaf.toml"
    leaf.write_text('base = "kl_cyclical"\n[kl]\ncycles = 3\n')
    top = tmp_path / "top.toml"
    top.write_text(f'base = "{leaf}"\n[optim]\nlr = 1e-4\n')
    assert resolve_spec(str(top)).kl.cycles == 3
    assert explicit_keys(str(top)) == {"optim.lr", "kl.cycles"}


def test_kl_kind_switch_carries_shared_fields_and_rejects_foreign_ones():
    spec = apply_overrides(SPECS["kl_cyclical"], {"kl.kind": "monotonic"})
    assert spec.kl.kind == "monotonic" and spec.kl.ratio == 0.5 and spec.kl.start == 0.1
    with pytest.raises(SpecError, match="unknown key kl.cycles"):
        apply_overrides(SPECS["kl_constant"], {"kl.cycles": "3"})


def test_parse_set_needs_equals():
    assert parse_set(["optim.lr=3e-4"]) == {"optim.lr": "3e-4"}
    with pytest.raises(SpecError, match="expected key=value"):
        parse_set(["optim.lr"])


def test_toml_spec_and_typo(tmp_path):
    good = tmp_path / "mine.toml"
    good.write_text('base = "report_final"\n[optim]\nlr = 1e-4\n[kl]\nkind = "monotonic"\n')
    spec = resolve_spec(str(good))
    assert spec.name == "mine" and spec.optim.lr == 1e-4 and spec.kl.kind == "monotonic"
    typo = tmp_path / "typo.toml"
    typo.write_text('base = "report_final"\n[optim]\nlrate = 1e-4\n')
    with pytest.raises(SpecError, match="unknown key 'optim.lrate'"):
        resolve_spec(str(typo))
    with pytest.raises(SpecError, match="unknown spec 'nope'; registered:"):
        resolve_spec("nope")


def test_profiles_change_size_not_science():
    full = SPECS["kl_cyclical"]
    cpu = apply_profile(full, "cpu")
    assert cpu.model.frame_dim < full.model.frame_dim
    assert cpu.train.epochs < full.train.epochs
    assert (cpu.kl.ratio, cpu.kl.start, cpu.kl.stop) == (0.5, 0.1, 1.0)
    # the cyclical period in epochs (400/40 = 10) is kept, with at least two cycles
    assert cpu.kl.cycles == max(2, round(40 * cpu.train.epochs / 400))
    assert apply_profile(full, "full") == full
    assert apply_profile(full, "smoke", epochs=3).train.epochs == 3
    with pytest.raises(SpecError, match="choose one of"):
        apply_profile(full, "huge")


def test_cpu_profile_lr_applies_unless_chosen(tmp_path):
    """The cpu profile's short-run lr (2e-3) replaces every arm's lr alike; an lr set by the
    user (--set, a spec file) is kept; the full profile keeps the spec's own."""
    for name in ("kl_cyclical", "lab_template"):
        assert apply_profile(SPECS[name], "cpu").optim.lr == 2e-3
        assert apply_profile(SPECS[name], "full").optim.lr == SPECS[name].optim.lr
    assert apply_profile(SPECS["kl_cyclical"], "cpu", keep={"optim.lr"}).optim.lr == 3e-4
    assert resolved("kl_cyclical", ["optim.lr=5e-4"], "cpu").optim.lr == 5e-4
    assert resolved("kl_cyclical", [], "cpu").optim.lr == 2e-3
    path = tmp_path / "mine.toml"
    path.write_text('base = "kl_cyclical"\n[optim]\nlr = 1e-4\n')
    assert explicit_keys(str(path)) == {"optim.lr"}
    assert resolved(str(path), [], "cpu").optim.lr == 1e-4
    on_top = tmp_path / "on_top.toml"  # a spec file built on another keeps its base's choice
    on_top.write_text(f'base = "{path}"\n[kl]\nratio = 0.25\n')
    assert resolved(str(on_top), [], "cpu").optim.lr == 1e-4


def resolved(name: str, overrides: list[str], profile: str) -> object:
    """As ``python -m experiments show NAME --set ... --profile P`` resolves it."""
    return resolve(name, profile=profile, overrides=parse_set(overrides))


def test_list_filters_with_glob():
    assert list_specs("kl_*") == ["kl_constant", "kl_cyclical", "kl_monotonic"]


def test_short_profiles_keep_cyclical_distinct_from_monotonic():
    from cvae.schedules import kl_beta

    for profile in ("smoke", "cpu"):
        cyc = apply_profile(SPECS["kl_cyclical"], profile)
        mono = apply_profile(SPECS["kl_monotonic"], profile)
        epochs = cyc.train.epochs
        assert cyc.kl.cycles >= 2
        cyc_betas = [kl_beta(cyc.kl, epoch=e, epochs=epochs) for e in range(epochs)]
        mono_betas = [kl_beta(mono.kl, epoch=e, epochs=epochs) for e in range(epochs)]
        assert cyc_betas != mono_betas, profile


def test_short_profiles_keep_every_multistep_lr_decay():
    """The template's MultiStepLR (2, 5) x 0.1 over 70 epochs ends at 0.01 x the base lr; a
    profile that shortens the run lands both milestones on epoch 1, and both must still
    apply (merging them left the lr 10x higher for the rest of the run)."""
    from cvae.train import lr_factor

    full = SPECS["lab_template"]
    full_end = lr_factor(full.train.epochs - 1, kind="multistep", epochs=full.train.epochs,
                         milestones=full.lr_schedule.milestones, gamma=full.lr_schedule.gamma)
    assert full_end == pytest.approx(0.01)
    for profile in ("smoke", "cpu"):
        spec = apply_profile(full, profile)
        factors = [lr_factor(e, kind="multistep", epochs=spec.train.epochs,
                             milestones=spec.lr_schedule.milestones,
                             gamma=spec.lr_schedule.gamma) for e in range(spec.train.epochs)]
        assert factors[0] == 1.0, profile
        assert factors[-1] == pytest.approx(full_end), profile


def test_profile_keeps_schedule_values_the_user_chose(tmp_path):
    """A profile rescales epoch-indexed schedules to its shorter run, except the values the
    user set (--set, a spec file): those run as written, as a chosen lr does."""
    chosen = ["kl.cycles=4", "teacher_forcing.decay_start=3",
              "teacher_forcing.decay_step=0.25", "lr_schedule.milestones=[2, 6]"]
    spec = resolved("tfr_decay", chosen, "cpu")
    assert spec.kl.cycles == 4
    assert (spec.teacher_forcing.decay_start, spec.teacher_forcing.decay_step) == (3, 0.25)
    assert spec.lr_schedule.milestones == (2, 6)
    rescaled = resolved("tfr_decay", [], "cpu")  # what the profile does by itself
    full = SPECS["tfr_decay"]
    assert rescaled.kl.cycles != 4 and rescaled.lr_schedule.milestones != (2, 6)
    assert rescaled.teacher_forcing.decay_start == round(
        full.teacher_forcing.decay_start * rescaled.train.epochs / full.train.epochs)
    path = tmp_path / "mine.toml"
    path.write_text('base = "tfr_decay"\n[kl]\ncycles = 3\n[teacher_forcing]\ndecay_start = 2\n')
    from_file = resolved(str(path), [], "cpu")
    assert (from_file.kl.cycles, from_file.teacher_forcing.decay_start) == (3, 2)
    assert from_file.teacher_forcing.decay_step == rescaled.teacher_forcing.decay_step


# Every key a profile rewrites, with a value no profile gives it.
EXPLICIT = {"model.frame_dim": 24, "model.label_dim": 6, "model.latent_dim": 5,
            "model.decoder_dim": 40, "model.encoder_width": 3, "optim.lr": 7e-4,
            "train.epochs": 5, "eval.every": 3, "kl.cycles": 3,
            "teacher_forcing.decay_start": 1, "teacher_forcing.decay_step": 0.3,
            "lr_schedule.milestones": (1, 3)}


@pytest.mark.parametrize("profile", ["smoke", "cpu", "full"])
@pytest.mark.parametrize("key", sorted(EXPLICIT))
def test_an_explicit_value_survives_every_profile(profile, key):
    """A value the user sets (--set, a spec file, a tuned value) runs as written at every
    profile; the profile still sets what the user did not choose."""
    value = EXPLICIT[key]
    spec = resolve("tfr_decay", profile=profile, overrides={key: value})
    assert flatten(spec)[key] == (list(value) if isinstance(value, tuple) else value)
    untouched = resolve("tfr_decay", profile=profile)
    others = {k: v for k, v in flatten(untouched).items() if k not in (key, "description")}
    if key != "train.epochs":  # a run's length moves the schedules it rescales
        assert {k: flatten(spec)[k] for k in others} == others


def test_explicit_values_from_a_spec_file_survive_the_profile(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('base = "kl_cyclical"\n[model]\nframe_dim = 24\n[train]\nepochs = 5\n'
                    "[eval]\nevery = 3\n")
    spec = resolve(str(path), profile="cpu")
    assert (spec.model.frame_dim, spec.train.epochs, spec.eval.every) == (24, 5, 3)
    assert spec.model.decoder_dim == 32  # the profile's, not chosen in the file


def test_show_says_which_values_came_from_the_profile(capsys):
    from experiments.__main__ import main

    assert main(["show", "kl_cyclical", "--profile", "cpu", "--set", "model.frame_dim=64"]) == 0
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("set by the profile cpu"))
    assert "model.decoder_dim=32 (spec: 192)" in line and "optim.lr=0.002" in line
    assert "frame_dim" not in line


@pytest.mark.parametrize("threads, env, share, expected", [
    (3, "1", 1, 3),        # --threads wins
    (None, "1", 1, 1),     # then OMP_NUM_THREADS, as torch itself reads it
    (None, "zero", 2, 1),  # not a whole number: ignored; 2 cores shared by 2 processes
    (None, None, 1, 2),    # all the cores this process may use
])
def test_pin_threads_choice(monkeypatch, threads, env, share, expected):
    import torch

    from experiments import cli

    monkeypatch.setattr(cli, "cpu_count", lambda: 2)
    if env is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", env)
    before = torch.get_num_threads()
    try:
        assert cli.pin_threads(threads, share=share) == expected
        assert torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(before)
