"""SimpleNet (Liu et al., CVPR 2023) as a plain ``nn.Module`` over cached patch features.

An adaptor (one Linear layer) maps frozen backbone features to a target space; a discriminator learns
to tell adapted features ``u`` (nominal) from ``u + eps`` (synthetic anomalies, Gaussian noise in
feature space). Patch loss: ``max(0, th - D(u)) + max(0, th + D(u + eps))``; anomaly score ``-D(u)``.

The noise is scale-free: ``eps ~ N(0, (noise_std * s)^2)`` where ``s`` is the training features'
measured spread (``FeatureStore.scale``: the RMS of the per-dimension standard deviations), stored in
the model as the ``feature_scale`` buffer. The paper's absolute sigma = 0.015 was set for
WideResNet-50's features; other backbones (and image sizes) put features on other scales, where a
fixed sigma is either invisible to the discriminator (it never learns) or trivially separable. The
margin is in discriminator-output units, which the BatchNorm in front keeps at O(1): it needs no scale.
"""

from __future__ import annotations

import torch
from torch import nn

from comet_ray.models.protocol import seeded_normal, weight_matrices


class SimpleNet(nn.Module):
    name = "simplenet"

    def __init__(
        self,
        feature_dim: int,
        hidden: int = 1024,
        noise_std: float = 0.015,
        margin: float = 0.5,
        adaptor_lr: float = 1e-4,
        discriminator_lr: float = 2e-4,
        discriminator_weight_decay: float = 1e-5,
        feature_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self._hparams = dict(
            feature_dim=feature_dim,
            hidden=hidden,
            noise_std=noise_std,
            margin=margin,
            adaptor_lr=adaptor_lr,
            discriminator_lr=discriminator_lr,
            discriminator_weight_decay=discriminator_weight_decay,
        )
        self.noise_std = noise_std
        self.margin = margin
        # Measured once on the training features (build_detector); a buffer, so checkpoints carry it.
        self.register_buffer("feature_scale", torch.tensor(float(feature_scale)))
        # No bias before the discriminator's BatchNorm: BatchNorm removes any constant shift, so those
        # biases would get only rounding noise as gradient, which Adam turns into +-lr steps, making
        # data-parallel runs drift from single-process ones for nothing. The model class is unchanged.
        self.adaptor = nn.Linear(feature_dim, feature_dim, bias=False)
        self.discriminator = nn.Sequential(
            nn.Linear(feature_dim, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, 1, bias=False),
        )
        nn.init.xavier_normal_(self.adaptor.weight)
        for layer in self.discriminator:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_normal_(layer.weight)

    def hparams(self) -> dict:
        return dict(self._hparams)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints from before the scale-free noise have no feature_scale: their noise was absolute.
        state_dict.setdefault(prefix + "feature_scale", torch.tensor(1.0))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _noise(self, adapted: torch.Tensor, sample_seeds: torch.Tensor) -> torch.Tensor:
        noise = seeded_normal(tuple(adapted.shape[1:]), sample_seeds, adapted.device)
        return (noise * (self.noise_std * self.feature_scale)).to(adapted.dtype)

    def _discriminate(self, patches: torch.Tensor) -> torch.Tensor:
        flat = patches.reshape(-1, patches.shape[-1])
        return self.discriminator(flat).reshape(patches.shape[:-1])

    def patch_losses(self, features: torch.Tensor, sample_seeds: torch.Tensor) -> torch.Tensor:
        adapted = self.adaptor(features)  # [B, P, D]
        # True and fake patches go through the discriminator together, as in SimpleNet: one BatchNorm batch.
        scores = self._discriminate(torch.cat([adapted, adapted + self._noise(adapted, sample_seeds)]))
        true_scores, fake_scores = scores.chunk(2)
        true_loss = torch.clamp(self.margin - true_scores, min=0)
        fake_loss = torch.clamp(self.margin + fake_scores, min=0)
        return (true_loss + fake_loss).float()

    def forward(self, features: torch.Tensor, sample_seeds: torch.Tensor) -> torch.Tensor:
        """Per-patch losses; the training step goes through ``forward`` so DDP can hook it."""
        return self.patch_losses(features, sample_seeds)

    def patch_scores(self, features: torch.Tensor) -> torch.Tensor:
        return -self._discriminate(self.adaptor(features)).float()

    @torch.no_grad()
    def separation(self, features: torch.Tensor, sample_seeds: torch.Tensor) -> float:
        """How well the discriminator tells true from fake patches, as scoring sees it (eval mode): the
        fraction of patches it scores as more nominal than their own noisy copy, ``D(u) > D(u + eps)``.
        0.5 = chance: not learning. Paired rather than against the margin, because in eval mode BatchNorm
        uses running statistics that lag a fast-moving discriminator and shift both sides alike."""
        was_training = self.training
        self.eval()
        adapted = self.adaptor(features)
        true_scores = self._discriminate(adapted).float()
        fake_scores = self._discriminate(adapted + self._noise(adapted, sample_seeds)).float()
        self.train(was_training)
        return float((true_scores > fake_scores).float().mean())

    def regularised_parameters(self, include_norm_and_bias: bool = False) -> list[nn.Parameter]:
        return weight_matrices(self, include_norm_and_bias)

    def make_optimizers(self, lr_scale: float = 1.0) -> list[torch.optim.Optimizer]:
        hp = self._hparams
        return [
            torch.optim.AdamW(self.adaptor.parameters(), lr=hp["adaptor_lr"] * lr_scale),
            torch.optim.Adam(
                self.discriminator.parameters(),
                lr=hp["discriminator_lr"] * lr_scale,
                weight_decay=hp["discriminator_weight_decay"],
            ),
        ]
