"""The lab's pose-conditioned video CVAE, layer for layer.

``encoder_width`` (16 in the lab) scales the frame encoder's internal channels (w, 2w, 4w) so
small profiles can shrink the whole model, not only the named dims.

Every convolution is stride 1 with "same" padding, so features and the latent stay at frame
resolution: frames (B, 3, H, W), frame features (B, F, H, W), label features (B, L, H, W),
latent z (B, N, H, W). At the lab dims (F=128, L=32, N=12, D=192) the model has 1,585,620
parameters, ~3.2 GMAC per frame step at 32x64.

Two lab quirks define the model and are kept on purpose:
- the template writes ``nn.LeakyReLU(True)``: negative_slope=1.0, i.e. the identity;
- the label encoder's BatchNorm2d is the only normalization layer.

Beyond the lab: ``output_activation="sigmoid"`` (the report's fix: frames live in [0, 1]) and
``prior="learned"`` (SVG-LP, Denton & Fergus 2018: p(z_t | x_{t-1}, P_t) is a second Gaussian
head on [frame features of the previous frame, label features]).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

OutputActivation = Literal["sigmoid", "identity"]
PriorKind = Literal["standard_normal", "learned"]
OUTPUT_ACTIVATIONS: tuple[str, ...] = ("sigmoid", "identity")
PRIOR_KINDS: tuple[str, ...] = ("standard_normal", "learned")


def _conv(in_ch: int, out_ch: int, kernel: int, *, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel, stride=1, padding=kernel // 2, groups=groups)


class ResidualBlock(nn.Module):
    """conv3x3 -> LeakyReLU(0.01) -> conv3x3 -> LeakyReLU(0.01), plus a 1x1 skip when in != out."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = _conv(in_ch, out_ch, 3)
        self.conv2 = _conv(out_ch, out_ch, 3)
        # In place: it only ever sees a fresh convolution output, which nothing else reads
        # (a convolution's backward needs its input, not its output).
        self.act = nn.LeakyReLU(0.01, inplace=True)
        self.skip = _conv(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = self.act(self.conv2(self.act(self.conv1(x))))
        return path + self.skip(x)


class DepthConv(nn.Module):
    """1x1 conv -> LeakyReLU -> depthwise 3x3 -> 1x1 conv, plus a 1x1 adaptor when in != out."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = nn.Sequential(_conv(in_ch, in_ch, 1), nn.LeakyReLU(0.01, inplace=True))
        self.depth_conv = _conv(in_ch, in_ch, 3, groups=in_ch)
        self.conv2 = _conv(in_ch, out_ch, 1)
        self.adaptor = _conv(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = self.conv2(self.depth_conv(self.conv1(x)))
        return path + (self.adaptor(x) if self.adaptor is not None else x)


class ConvFFN(nn.Module):
    """Gated 1x1 feed-forward: x + conv_out(x1 * LeakyReLU(0.1)(x2)) with [x1, x2] = conv(x)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv(channels, 4 * channels, 1)
        self.conv_out = _conv(2 * channels, channels, 1)
        self.act = nn.LeakyReLU(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.conv(x).chunk(2, dim=1)
        return x + self.conv_out(x1 * self.act(x2))


class DepthConvBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.block = nn.Sequential(DepthConv(in_ch, out_ch), ConvFFN(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def _lab_identity() -> nn.LeakyReLU:
    # The template's `nn.LeakyReLU(True)`: True is the negative slope, so this is the identity.
    return nn.LeakyReLU(1.0)


def frame_encoder(out_ch: int, width: int = 16) -> nn.Sequential:
    """The lab's widths are (16, 32, 64): ``width`` = 16."""
    w1, w2, w3 = width, 2 * width, 4 * width
    return nn.Sequential(
        ResidualBlock(3, w1), DepthConvBlock(w1, w1),
        ResidualBlock(w1, w2), DepthConvBlock(w2, w2),
        ResidualBlock(w2, w3), DepthConvBlock(w3, w3),
        _conv(w3, out_ch, 3),
    )


def label_encoder(out_ch: int) -> nn.Sequential:
    half = out_ch // 2
    return nn.Sequential(
        nn.ReflectionPad2d(3),
        nn.Conv2d(3, half, 7, padding=0),
        nn.BatchNorm2d(half),
        _lab_identity(),
        ResidualBlock(half, out_ch),
    )


def gaussian_head(in_ch: int, latent_ch: int) -> nn.Sequential:
    """Outputs (B, 2N, H, W) = [mu, logvar] stacked on channels."""
    quarter, half = latent_ch // 4, latent_ch // 2
    return nn.Sequential(
        ResidualBlock(in_ch, quarter), DepthConvBlock(quarter, quarter),
        ResidualBlock(quarter, half), DepthConvBlock(half, half),
        ResidualBlock(half, latent_ch),
        _lab_identity(),
        _conv(latent_ch, 2 * latent_ch, 1),
    )


def decoder_fusion(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        DepthConvBlock(in_ch, in_ch),
        ResidualBlock(in_ch, in_ch // 4),
        DepthConvBlock(in_ch // 4, in_ch // 2),
        ResidualBlock(in_ch // 2, in_ch // 2),
        DepthConvBlock(in_ch // 2, out_ch // 2),
        _conv(out_ch // 2, out_ch, 1),
    )


def generator(in_ch: int) -> nn.Sequential:
    return nn.Sequential(
        DepthConvBlock(in_ch, in_ch), ResidualBlock(in_ch, in_ch // 2),
        DepthConvBlock(in_ch // 2, in_ch // 2), ResidualBlock(in_ch // 2, in_ch // 4),
        DepthConvBlock(in_ch // 4, in_ch // 4), ResidualBlock(in_ch // 4, in_ch // 8),
        DepthConvBlock(in_ch // 8, in_ch // 8),
        _conv(in_ch // 8, 3, 1),
    )


class VideoCVAE(nn.Module):
    """The lab's CVAE. Holds parameters and forward math only (no optimizer, no loop).

    Attribute order matches the template (frame, label, posterior, fusion, generator), so a
    template checkpoint maps onto it by a prefix rename (see ``cvae.checkpoints``).
    """

    def __init__(
        self,
        *,
        frame_dim: int = 128,
        label_dim: int = 32,
        latent_dim: int = 12,
        decoder_dim: int = 192,
        encoder_width: int = 16,
        output_activation: OutputActivation = "sigmoid",
        prior: PriorKind = "standard_normal",
    ):
        super().__init__()
        if output_activation not in OUTPUT_ACTIVATIONS:
            raise ValueError(
                f"output_activation={output_activation!r}; choose one of {OUTPUT_ACTIVATIONS}"
            )
        if prior not in PRIOR_KINDS:
            raise ValueError(f"prior={prior!r}; choose one of {PRIOR_KINDS}")
        if latent_dim < 4 or label_dim < 2 or decoder_dim < 8 or encoder_width < 1:
            raise ValueError(
                "need latent_dim >= 4, label_dim >= 2, decoder_dim >= 8, encoder_width >= 1")
        self.output_activation = output_activation
        self.prior_kind = prior
        self.latent_dim = latent_dim
        fused = frame_dim + label_dim + latent_dim
        self.frame_encoder = frame_encoder(frame_dim, encoder_width)
        self.label_encoder = label_encoder(label_dim)
        self.posterior_head = gaussian_head(frame_dim + label_dim, latent_dim)
        self.decoder_fusion = decoder_fusion(fused, decoder_dim)
        self.generator = generator(decoder_dim)
        self.prior_head = (
            gaussian_head(frame_dim + label_dim, latent_dim) if prior == "learned" else None
        )

    # -- the pieces the rollout composes ---------------------------------------------------
    def posterior_from_features(
        self, frame_features: torch.Tensor, label_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        stats = self.posterior_head(torch.cat([frame_features, label_features], dim=1))
        mu, logvar = stats.chunk(2, dim=1)  # each (B, N, H, W)
        return mu, logvar

    def prior_from_features(
        self, prev_features: torch.Tensor, label_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """p(z_t | x_{t-1}, P_t): zeros (N(0, I)) for the lab prior, a Gaussian head if learned."""
        if self.prior_head is None:
            B, _, H, W = prev_features.shape
            zeros = prev_features.new_zeros(B, self.latent_dim, H, W)
            return zeros, zeros
        stats = self.prior_head(torch.cat([prev_features, label_features], dim=1))
        mu, logvar = stats.chunk(2, dim=1)
        return mu, logvar

    def decode_from_features(
        self, prev_features: torch.Tensor, label_features: torch.Tensor, z: torch.Tensor
    ) -> torch.Tensor:
        """Raw generator output (no output activation): (B, 3, H, W)."""
        fused = self.decoder_fusion(torch.cat([prev_features, label_features, z], dim=1))
        return self.generator(fused)

    def activate(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(raw) if self.output_activation == "sigmoid" else raw

    # -- public API ------------------------------------------------------------------------
    def posterior(
        self, frame: torch.Tensor, label: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z | x_t, P_t) -> (mu, logvar), each (B, N, H, W)."""
        return self.posterior_from_features(self.frame_encoder(frame), self.label_encoder(label))

    def prior(
        self, prev_frame: torch.Tensor, label: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.prior_from_features(self.frame_encoder(prev_frame), self.label_encoder(label))

    def decode(self, prev_frame: torch.Tensor, label: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x_hat_t from the previous frame, the pose label and z, output activation applied."""
        raw = self.decode_from_features(
            self.frame_encoder(prev_frame), self.label_encoder(label), z
        )
        return self.activate(raw)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = mu + sigma * eps (Kingma & Welling 2014); eps is passed in so RNG stays outside."""
    return mu + torch.exp(0.5 * logvar) * eps


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
