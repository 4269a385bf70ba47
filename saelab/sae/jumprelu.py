"""JumpReLU SAE for inference (Rajamanoharan et al. 2024, "Jumping Ahead"; the Gemma Scope format).

z_i = pre_i if pre_i > threshold_i and pre_i > 0, else 0, with a learned per-latent `threshold` [n].
This is the exact inference rule of SAELens's JumpReLU SAE (ReLU, then the threshold mask), so JumpReLU
SAEs trained elsewhere load and run unchanged. Training (straight-through threshold gradients and an
L0 penalty) is not implemented here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from saelab.sae.base import SAE, SAEConfig, TrainContext, TrainOutput
from saelab.sae.registry import register


@dataclass
class JumpReLUConfig(SAEConfig):
    architecture: str = "jumprelu"


@register("jumprelu")
class JumpReLUSAE(SAE):
    config_class = JumpReLUConfig
    trainable = False
    saelens_architecture = "jumprelu"
    saelens_reads = ("jumprelu",)
    dictionary_learning_class = "JumpReluAutoEncoder"
    dictionary_learning_trainer = "JumpReluTrainer"
    cfg: JumpReLUConfig

    def create_parameters(self, dtype: torch.dtype) -> None:
        super().create_parameters(dtype)
        self.threshold = nn.Parameter(torch.zeros(self.d_sae, dtype=dtype))

    def encode_rows(self, x: Tensor) -> Tensor:
        """x [B, d_in] -> z [B, n] = ReLU(pre) * (pre > threshold)."""
        pre = self.pre_activations(x)
        return pre.relu() * (pre > self.threshold)

    def dictionary_learning_extras(self) -> dict[str, Tensor]:
        """The per-latent threshold [n]."""
        return {"threshold": self.threshold.detach().cpu().contiguous()}

    @classmethod
    def config_from_dictionary_learning(
        cls, extras: dict[str, Tensor], trainer: dict[str, Any], where: str
    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """The threshold [n] (checked against d_sae when loaded)."""
        return {}, {"threshold": extras["threshold"]}

    def training_forward(self, x: Tensor, ctx: TrainContext) -> TrainOutput:
        raise NotImplementedError(
            "saelab's JumpReLU SAE is inference-only (for loading pretrained JumpReLU SAEs such as Gemma Scope); "
            "train with sae=topk or sae=relu instead."
        )
