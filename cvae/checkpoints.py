"""Checkpoints: the lab template's format (for the course's tester) and our resumable one.

The template names its modules ``frame_transformation``, ``label_transformation``,
``Gaussian_Predictor``, ``Decoder_Fusion``, ``Generator``; ours differ only in those prefixes.
The template stores the model weights under ``"state_dict"`` and, by a bug, again under
``"optimizer"``; we write both so its tester loads our file unchanged.

Everything is loaded with ``weights_only=True``: a checkpoint is data, never code.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cvae.model import VideoCVAE

# ours -> template
LAB_PREFIXES: dict[str, str] = {
    "frame_encoder": "frame_transformation",
    "label_encoder": "label_transformation",
    "posterior_head": "Gaussian_Predictor",
    "decoder_fusion": "Decoder_Fusion",
    "generator": "Generator",
}


def _rename(state: Mapping[str, torch.Tensor], mapping: Mapping[str, str]) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head not in mapping:
            raise KeyError(f"unexpected checkpoint key {key!r}; known prefixes: {sorted(mapping)}")
        renamed[f"{mapping[head]}.{rest}"] = value
    return renamed


def lab_dims(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Read (F, L, N, D) off the shapes of a template-named state dict."""
    return {
        "frame_dim": state["frame_transformation.6.weight"].shape[0],
        "label_dim": state["label_transformation.4.conv1.weight"].shape[0],
        "latent_dim": state["Gaussian_Predictor.6.weight"].shape[0] // 2,
        "decoder_dim": state["Decoder_Fusion.5.weight"].shape[0],
        "encoder_width": state["frame_transformation.0.conv1.weight"].shape[0],
    }


def load_lab_checkpoint(
    path_or_state_dict: str | os.PathLike | Mapping[str, Any], **model_options: Any
) -> VideoCVAE:
    """Build our model from a template checkpoint (a file, a checkpoint dict or a state dict).

    Dims are read from the tensor shapes; ``model_options`` (e.g. ``output_activation``)
    override them. The template model has no output activation: pass
    ``output_activation="identity"`` to reproduce it exactly.
    """
    if isinstance(path_or_state_dict, Mapping):
        blob = path_or_state_dict
    else:
        blob = torch.load(path_or_state_dict, map_location="cpu", weights_only=True)
    state = blob.get("state_dict", blob)
    options = {**lab_dims(state), **model_options}
    model = VideoCVAE(**options)
    inverse = {lab: ours for ours, lab in LAB_PREFIXES.items()}
    model.load_state_dict(_rename(state, inverse), strict=True)
    return model


def save_lab_checkpoint(
    model: VideoCVAE, path: str | os.PathLike, *, lr: float = 0.0,
    teacher_forcing_ratio: float = 0.0, epoch: int = 0,
) -> Path:
    """Write a checkpoint the course's tester loads (template keys; learned prior not allowed)."""
    if model.prior_head is not None:
        raise ValueError("the lab template has no learned-prior head; cannot save prior='learned'")
    state = _rename({k: v.detach().cpu() for k, v in model.state_dict().items()}, LAB_PREFIXES)
    blob = {
        "state_dict": state,
        "optimizer": state,  # the template's own (buggy) key for the same weights
        "lr": lr,
        "tfr": teacher_forcing_ratio,
        "last_epoch": epoch,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(blob, path)
    return path


def save_training_checkpoint(state_dict: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a resumable checkpoint atomically (temp file + rename): a crash mid-write never
    replaces a good checkpoint with a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(dict(state_dict), tmp)
    os.replace(tmp, path)
    return path


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: truncated, corrupt, or not a checkpoint."""


def load_training_checkpoint(path: str | os.PathLike, *, map_location: Any = "cpu") -> dict[str, Any]:
    """The dict ``save_training_checkpoint`` wrote. A file that does not unpickle as one
    (truncated, corrupt, or carrying code that ``weights_only`` refuses) raises
    ``CheckpointError`` with the reason in one line; I/O errors stay ``OSError``s."""
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001  (zip, pickle, EOF, ... errors: all "unreadable")
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{Path(path).name} is unreadable ({reason})") from None
    if not isinstance(blob, dict):
        raise CheckpointError(f"{Path(path).name} holds a {type(blob).__name__}, not a "
                              "checkpoint dict")
    return blob
