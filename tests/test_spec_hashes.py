"""Spec hashes are the identity of stored runs: a finished (spec, seed) is reused, an
interrupted one resumed, by its ``spec_hash``. A refactor that changed a registered spec's
hash at any profile would silently rerun every study from scratch, so they are pinned here.
A deliberate change of a default (a new default evaluation, say) changes them on purpose: then
update this table in the same commit and say so in the README."""

from __future__ import annotations

from dataclasses import replace

import pytest

from experiments.registry import ABLATIONS, SPECS, resolve
from experiments.spec import spec_hash

# name: (as registered, at smoke, at cpu, at full); None: not a registered spec
PINNED = {
    "lab_template": ("e0d0c90a0dde", "ee5c4f649d20", "bbe4d46c1587", "e0d0c90a0dde"),
    "report_final": ("af3cd956cb83", "93d38a105e2c", "ed1c977bb5f8", "af3cd956cb83"),
    "kl_cyclical": ("af3cd956cb83", "93d38a105e2c", "ed1c977bb5f8", "af3cd956cb83"),
    "kl_monotonic": ("a2cd3f99c97a", "d6b091502f69", "9c2a4c2e983a", "a2cd3f99c97a"),
    "kl_constant": ("d5c3def667f5", "d54435cf2f10", "7d7709be35bb", "d5c3def667f5"),
    "tfr_decay": ("5f2146e6ca95", "9e41090c4274", "7fc52a698425", "5f2146e6ca95"),
    "tfr_off": ("af3cd956cb83", "93d38a105e2c", "ed1c977bb5f8", "af3cd956cb83"),
    "sigmoid": ("af3cd956cb83", "93d38a105e2c", "ed1c977bb5f8", "af3cd956cb83"),
    "identity": ("bcb4ccd5d5d6", "f526e798df02", "1441ddc7f7cb", "bcb4ccd5d5d6"),
    "prior_standard": ("af3cd956cb83", "93d38a105e2c", "ed1c977bb5f8", "af3cd956cb83"),
    "prior_learned": ("cd4b3cd30c05", "c4c6b7f09fbd", "872246ce6b9c", "cd4b3cd30c05"),
    "tfr_decay+kl_cyclical": (None, "9e41090c4274", "7fc52a698425", "5f2146e6ca95"),
    "tfr_decay+kl_monotonic": (None, "84bb5c6872b7", "1f8f60a1dba2", "c4f63d476a97"),
    "tfr_decay+kl_constant": (None, "95924b4205f7", "8cf82631cb49", "a318540fae23"),
    "tfr_off+kl_cyclical": (None, "93d38a105e2c", "ed1c977bb5f8", "af3cd956cb83"),
    "tfr_off+kl_monotonic": (None, "d6b091502f69", "9c2a4c2e983a", "a2cd3f99c97a"),
    "tfr_off+kl_constant": (None, "d54435cf2f10", "7d7709be35bb", "d5c3def667f5"),
    # The calibration ablation: the reference is report_final itself; the copy differs by its
    # replicate salt alone, the known-worse arm by its lr_scale alone.
    "calibration_reference": (None, "93d38a105e2c", "ed1c977bb5f8", "af3cd956cb83"),
    "calibration_copy": (None, "c0632455ead7", "7d2bd5a37cd6", "8e3603b1dcf8"),
    "calibration_low_lr": (None, "6da6cf413758", "cc058b290baf", "c9dbe0c6b7e4"),
}
PROFILE_COLUMNS = {"smoke": 1, "cpu": 2, "full": 3}


def _specs():
    yield from SPECS.items()
    for ablation in ABLATIONS.values():
        for arm in ablation.arms:
            if arm.name not in SPECS:
                yield arm.name, arm.spec


def test_every_registered_spec_and_arm_is_pinned():
    assert {name for name, _ in _specs()} == set(PINNED)


@pytest.mark.parametrize("name,spec", list(_specs()), ids=[n for n, _ in _specs()])
def test_spec_hashes_are_unchanged_at_every_profile(name, spec):
    registered, *_ = PINNED[name]
    if registered is not None:
        assert spec_hash(spec) == registered
    for profile, column in PROFILE_COLUMNS.items():
        assert spec_hash(resolve(spec, profile=profile)) == PINNED[name][column], profile


@pytest.mark.parametrize("arm, key, default", [("calibration_copy", "replicate", 0),
                                                ("calibration_low_lr", "lr_scale", 1.0)])
def test_calibration_arms_differ_from_the_reference_by_one_key(arm, key, default):
    """Set back to its default, the one key an arm changes gives the reference's hash (a key
    at its default is left out of the hash, so every spec stored before it keeps its own)."""
    arms = {a.name: a.spec for a in ABLATIONS["calibration"].arms}
    section = "train" if key == "replicate" else "optim"
    for profile in PROFILE_COLUMNS:
        spec = resolve(arms[arm], profile=profile)
        back = replace(spec, **{section: replace(getattr(spec, section), **{key: default})})
        assert spec_hash(spec) != spec_hash(back)
        assert spec_hash(back) == spec_hash(resolve(arms["calibration_reference"],
                                                    profile=profile))
