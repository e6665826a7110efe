"""Losses of the CVAE objective (Kingma & Welling 2014; Babaeizadeh et al. 2018 for video).

Per clip: sum_t [ MSE(x_hat_t, x_t) + beta * KL_t ]. The lab's KL sums over every latent element
and divides by the batch size, while the MSE is a per-pixel mean, so the KL term is large next
to the MSE: beta is chosen accordingly (and the report starts it at 0.1, not 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _lab_sum(terms: torch.Tensor, per_step: bool) -> torch.Tensor:
    """Sum over every element, divided by the batch size (dim 0); ``per_step``: terms are
    (B, S, ...) and each of the S steps gets its own sum, (S,)."""
    batch = terms.shape[0]
    if per_step:
        return terms.transpose(0, 1).flatten(1).sum(1) / batch
    return terms.sum() / batch


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor, *,
                       per_step: bool = False) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) = -1/2 sum(1 + logvar - mu^2 - exp(logvar)) / B.

    mu, logvar: (B, ...). Summed over all latent elements, divided by the batch size (lab).
    ``per_step``: mu, logvar are (B, S, ...) and the result is each step's KL, (S,).
    """
    return -0.5 * _lab_sum(1 + logvar - mu.pow(2) - logvar.exp(), per_step)


def kl_gaussians(
    mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor, *,
    per_step: bool = False,
) -> torch.Tensor:
    """KL(N(mu_q, var_q) || N(mu_p, var_p)) for diagonal Gaussians, lab reduction (sum / B).

    1/2 sum( logvar_p - logvar_q + (var_q + (mu_q - mu_p)^2) / var_p - 1 ); ``per_step`` as
    in ``kl_standard_normal``.
    """
    var_ratio = torch.exp(logvar_q - logvar_p)
    mean_term = (mu_q - mu_p).pow(2) * torch.exp(-logvar_p)
    return 0.5 * _lab_sum(logvar_p - logvar_q + var_ratio + mean_term - 1, per_step)


def reconstruction_mse(prediction: torch.Tensor, target: torch.Tensor, *,
                       per_step: bool = False) -> torch.Tensor:
    """Mean squared error over every pixel of the batch (the lab's nn.MSELoss()).
    ``per_step``: (B, S, ...) inputs, one mean per step, (S,)."""
    if per_step:
        return (prediction - target).pow(2).transpose(0, 1).flatten(1).mean(1)
    return F.mse_loss(prediction, target)
