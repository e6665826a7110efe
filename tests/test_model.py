"""The model against the lab template's own golden tensors, and the checkpoint round trips."""

from pathlib import Path

import pytest
import torch

from cvae.checkpoints import load_lab_checkpoint, save_lab_checkpoint
from cvae.model import VideoCVAE, count_parameters, reparameterize

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def golden():
    return torch.load(FIXTURES / "lab_template_golden.pt", weights_only=True)


def test_parameter_count_matches_lab():
    assert count_parameters(VideoCVAE()) == 1_585_620


def test_state_dict_keys_and_shapes_match_template(tmp_path):
    import json

    spec = json.loads((FIXTURES / "lab_template_state_dict.json").read_text())
    path = save_lab_checkpoint(VideoCVAE(), tmp_path / "lab.ckpt")
    state = torch.load(path, weights_only=True)["state_dict"]
    assert {k: list(v.shape) for k, v in state.items()} == spec["state_dict_shapes"]


def test_golden_equivalence(golden):
    model = load_lab_checkpoint(golden["state_dict"], output_activation="identity").eval()
    with torch.no_grad():
        mu, logvar = model.posterior(golden["cur"], golden["label"])
        z = reparameterize(mu, logvar, golden["eps"])
        raw = model.decode(golden["prev"], golden["label"], z)
    for name, ours in [("mu", mu), ("logvar", logvar), ("z", z), ("out_raw", raw)]:
        err = (ours - golden[name]).abs().max().item()
        assert err <= 1e-5, f"{name}: max abs error {err}"


def test_sigmoid_output_applies_to_decode(golden):
    model = load_lab_checkpoint(golden["state_dict"], output_activation="sigmoid").eval()
    with torch.no_grad():
        out = model.decode(golden["prev"], golden["label"], golden["z"])
    torch.testing.assert_close(out, torch.sigmoid(golden["out_raw"]), atol=1e-5, rtol=0)


def test_lab_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = VideoCVAE(frame_dim=16, label_dim=8, latent_dim=4, decoder_dim=16)
    path = save_lab_checkpoint(model, tmp_path / "m.ckpt", lr=1e-3, epoch=3)
    blob = torch.load(path, weights_only=True)
    assert blob["last_epoch"] == 3 and blob["optimizer"].keys() == blob["state_dict"].keys()
    loaded = load_lab_checkpoint(path)  # dims read back from the shapes
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_learned_prior_has_its_own_head_and_cannot_be_saved_as_lab(tmp_path):
    model = VideoCVAE(frame_dim=16, label_dim=8, latent_dim=4, decoder_dim=16, prior="learned")
    prev = torch.rand(2, 3, 8, 16)
    mu, logvar = model.prior(prev, torch.rand(2, 3, 8, 16))
    assert mu.shape == (2, 4, 8, 16) and logvar.shape == mu.shape
    assert mu.abs().sum() > 0  # not the standard normal
    with pytest.raises(ValueError, match="learned"):
        save_lab_checkpoint(model, tmp_path / "x.ckpt")


def test_standard_prior_is_zero():
    model = VideoCVAE(frame_dim=16, label_dim=8, latent_dim=4, decoder_dim=16)
    mu, logvar = model.prior(torch.rand(1, 3, 8, 16), torch.rand(1, 3, 8, 16))
    assert mu.abs().sum() == 0 and logvar.abs().sum() == 0


@pytest.mark.parametrize("kwargs", [{"output_activation": "relu"}, {"prior": "flow"}])
def test_unknown_choice_lists_valid_ones(kwargs):
    with pytest.raises(ValueError, match="choose one of"):
        VideoCVAE(**kwargs)
