"""Same-shape TopK SAEs on one hook stepped as one computation.

Each SAE keeps its own parameters, Adam state and Trainer (clipping, schedule, dead-latent tracker, checkpoints
are per SAE, as in a run alone). Only the training forward and its backward are batched: per step the S SAEs'
weights are stacked (an autograd-tracked copy, O(S * n * d), against the encoder's O(S * B * n * d) FLOPs),

    pre [S, B, n] = (x_s - b_dec_s) @ W_enc_s + b_enc_s      one batched matmul, no gradient
    values, indices [S * B, k] = top k of each row              one grouped top-k over every SAE's rows

and the sparse encoder / decoder kernels (`saelab.kernels`) run once over the stack read as one dictionary of
S * n latents, SAE s owning latents s * n .. (s + 1) * n - 1 (its codes' indices offset by s * n). AuxK's codes
(sparse, `select_auxk(dense=False)`, per SAE from its own dead latents) join as a second column group, padded
with zero codes to the stack's widest. Each SAE's loss is its own FVU (+ AuxK) on its rows; the summed losses
share no parameter, so one backward gives every SAE exactly its own gradient. The result equals the SAEs
stepped one by one up to float rounding (the same sums in another order).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from saelab.kernels import SlotPlan, sparse_decode_groups, sparse_encoder_values, topk_select
from saelab.kernels.auxk import AuxSelection, select_auxk
from saelab.sae.base import TrainContext, TrainOutput
from saelab.sae.losses import dead_residual_loss, fraction_of_variance_unexplained, sparse_activity
from saelab.sae.topk import TopKSAE

#: stack modes: "on" stacks every group of stackable SAEs whole, "off" steps each SAE alone, "auto" splits the
#: groups into stacks whose pre-activations [S, B, n] stay within AUTO_STACK_BYTES of the device type.
STACK_MODES = ("auto", "on", "off")
#: Measured on CPU (scripts/bench_together.py, BENCHMARKS.md "Many SAEs from one activation stream"): 8 TopK SAEs
#: stacked were 1.05-1.6x faster than looped while their stacked pre-activations took <= 64 MiB, 5-7% slower at
#: 128-256 MiB. CUDA's bound is not measured (no GPU was at hand): stacking saves kernel launches there, so it is on
#: for any stack whose pre-activations take up to 2 GiB.
AUTO_STACK_BYTES = {"cpu": 64 * 2**20, "cuda": 2 * 2**30}


def stack_limit(mode: str, device: torch.device) -> int | None:
    """The most bytes of stacked pre-activations one stack may hold under stack `mode` on `device`: None for no
    bound ("on"), 0 for no stacking ("off", or a device type without a measured bound)."""
    if mode not in STACK_MODES:
        raise ValueError(f"stack={mode!r} must be one of {list(STACK_MODES)}.")
    return {"on": None, "off": 0}.get(mode, AUTO_STACK_BYTES.get(device.type, 0))


def stack_sizes(count: int, batch_size: int, d_sae: int, limit: int | None) -> list[int]:
    """How `count` stackable SAEs of width d_sae split into stacks (sizes; 1 = steps alone) so that each stack's
    float32 pre-activations [S, batch_size, d_sae] take at most `limit` bytes (None: one stack)."""
    per = max(1, limit // (4 * batch_size * d_sae)) if limit is not None else count
    return [min(per, count - start) for start in range(0, count, per)]


def stack_key(trainer: Any) -> tuple | None:
    """What SAEs stepped as one stack share (plain TopK, shape, k, dtype, device, autocast), or None for a trainer
    that steps alone: another variant, a compiled forward, or a data-parallel run (its gradients are averaged by
    DDP per SAE)."""
    sae = trainer.sae
    if type(sae) is not TopKSAE or trainer.cfg.compile or trainer.dist.enabled:
        return None
    cfg = sae.cfg
    return (cfg.d_in, cfg.d_sae, cfg.k, sae.W_enc.dtype, trainer.device, trainer.autocast_dtype)


class TopKStack:
    """Trainers of plain TopK SAEs with one `stack_key`, stepped together on their hook's batches."""

    def __init__(self, trainers: Sequence[Any]):
        if len({stack_key(t) for t in trainers}) != 1 or stack_key(trainers[0]) is None:
            raise ValueError(
                "a TopKStack needs trainers of plain TopK SAEs with one shape, k, dtype and device."
            )
        self.trainers = list(trainers)
        self._pre: Tensor | None = None  # CPU workspace for the pre-activations, as TopKSAE keeps one

    def train_step(self, x: Tensor) -> list[TrainOutput]:
        """One step of every SAE on the raw batch x [B, d_in]; returns their outputs in trainer order."""
        inputs = [trainer.step_inputs(x) for trainer in self.trainers]
        with self.trainers[0].autocast():
            outs = self.forward([scaled for scaled, _ in inputs], [ctx for _, ctx in inputs])
        for trainer in self.trainers:
            trainer.optimizer.zero_grad(set_to_none=True)
        torch.stack([out.loss for out in outs]).sum().backward()
        for trainer, out in zip(self.trainers, outs, strict=True):
            trainer.apply_gradients(trainer.dist.any_fired(out.fired), x.shape[0])
        return outs

    def forward(self, xs: list[Tensor], ctxs: list[TrainContext]) -> list[TrainOutput]:
        """Every SAE's training forward: xs[s] [B, d] its scaled input, ctxs[s] its step context."""
        saes: list[TopKSAE] = [t.sae for t in self.trainers]
        count, n, k = len(saes), saes[0].d_sae, saes[0].cfg.k
        batch, d = xs[0].shape
        encoder_rows = torch.stack([s.W_enc.T for s in saes])  # [S, n, d]: W_enc_s^T
        b_enc = torch.stack([s.b_enc for s in saes])  # [S, n]
        decoder_rows = torch.stack([s.W_dec for s in saes])  # [S, n, d]
        b_dec = torch.stack([s.b_dec for s in saes])  # [S, d]
        x = torch.stack(xs)  # [S, B, d]
        centred = x - b_dec[:, None]  # gradient reaches b_dec through the encoder's input
        with torch.no_grad():
            pre = self.pre_activations(centred.detach(), encoder_rows.detach(), b_enc.detach())
            values, indices = topk_select(pre.view(count * batch, n), k)
            values = values.relu()
            auxes = [
                select_auxk(pre[s], ctx.dead_mask, ctx.dead_latents, sae.aux_k, dense=False)
                if sae.cfg.aux_k_coef > 0 and ctx.any_dead
                else None
                for s, (sae, ctx) in enumerate(zip(saes, ctxs, strict=True))
            ]
            del pre
        offsets = torch.arange(count, device=x.device)[:, None, None] * n  # SAE s's latents start at s * n
        local = indices.view(count, batch, k)
        widths: tuple[int, ...] = (k,)
        all_values, all_indices = values.view(count, batch, k), local + offsets
        aux_width = max((a.values.shape[1] for a in auxes if a is not None), default=0)
        if aux_width:
            aux_values, aux_indices = stacked_aux_codes(auxes, batch, aux_width, values.dtype, x.device)
            all_values = torch.cat([all_values, aux_values], dim=2)
            all_indices = torch.cat([all_indices, aux_indices + offsets], dim=2)
            widths = (k, aux_width)
        flat_values = all_values.reshape(count * batch, -1)
        flat_indices = all_indices.reshape(count * batch, -1)
        plan = SlotPlan(flat_indices, count * n)
        no_bias = torch.zeros(d, dtype=b_dec.dtype, device=x.device)  # centring is done above, per SAE
        codes = sparse_encoder_values(
            flat_values,
            flat_indices,
            centred.reshape(count * batch, d),
            encoder_rows.reshape(count * n, d).T,
            b_enc.reshape(count * n),
            no_bias,
            plan,
        )
        decoded = sparse_decode_groups(codes, flat_indices, decoder_rows.reshape(count * n, d), widths, plan)
        decoded = decoded.view(count, batch, len(widths), d)
        codes = codes.view(count, batch, -1)
        return [
            self.output(sae, xs[s], decoded[s], b_dec[s], codes[s, :, :k], local[s], auxes[s])
            for s, sae in enumerate(saes)
        ]

    def pre_activations(self, centred: Tensor, encoder_rows: Tensor, b_enc: Tensor) -> Tensor:
        """[S, B, n] = centred [S, B, d] @ encoder_rows[s]^T + b_enc [S, n]; on CPU without autocast into a kept
        workspace (a fresh tensor of that size costs page faults, `TopKSAE.selection_pre_activations`)."""
        weights = encoder_rows.transpose(1, 2)
        if centred.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
            return torch.baddbmm(b_enc[:, None], centred, weights)
        shape = (centred.shape[0], centred.shape[1], weights.shape[2])
        if self._pre is None or self._pre.shape != shape or self._pre.dtype != centred.dtype:
            self._pre = torch.empty(shape, dtype=centred.dtype)
        return torch.baddbmm(b_enc[:, None], centred, weights, out=self._pre)

    @staticmethod
    def output(
        sae: TopKSAE,
        x: Tensor,
        decoded: Tensor,
        b_dec: Tensor,
        codes: Tensor,
        indices: Tensor,
        aux: AuxSelection | None,
    ) -> TrainOutput:
        """One SAE's TrainOutput, as `TopKSAE.train_on_codes` forms it: x [B, d]; decoded [B, G, d] (TopK
        group, then AuxK's); codes, indices [B, k] its TopK codes (local latent ids)."""
        x_hat = decoded[:, 0] + b_dec
        fvu = fraction_of_variance_unexplained(x, x_hat)
        loss, metrics = fvu, {"fvu": fvu.detach()}
        if aux is not None:
            auxk = dead_residual_loss(x - x_hat.detach(), decoded[:, -1], aux.n_dead, sae.aux_k)
            loss = loss + sae.cfg.aux_k_coef * auxk
            metrics["auxk"] = auxk.detach()
        fired, l0 = sparse_activity(codes > 0, indices, sae.d_sae)
        return TrainOutput(loss=loss, x_hat=x_hat, fired=fired, l0=l0, metrics=metrics)


def stacked_aux_codes(
    auxes: list[AuxSelection | None], batch: int, width: int, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Every SAE's sparse AuxK codes padded to `width` columns -> (values [S, B, width], local indices
    [S, B, width]); padding (and SAEs without AuxK this step) are zero codes on latent 0, which add nothing."""
    values = torch.zeros(len(auxes), batch, width, dtype=dtype, device=device)
    indices = torch.zeros(len(auxes), batch, width, dtype=torch.long, device=device)
    for s, aux in enumerate(auxes):
        if aux is not None:
            w = aux.values.shape[1]
            values[s, :, :w] = aux.values.to(dtype)
            indices[s, :, :w] = aux.indices
    return values, indices


def plan_units(trainers: Sequence[Any], hooks: Sequence[Any], limit: int | None) -> list[tuple[Any, Any]]:
    """How a step runs the trainers: (hook, a TopKStack of 2+ trainers or a single trainer) in trainer order of
    first appearance; trainers sharing a hook and a `stack_key` form stacks of `stack_sizes` (limit: bytes of
    stacked pre-activations, `stack_limit`)."""
    groups: dict[tuple, list[Any]] = {}
    for index, (trainer, hook) in enumerate(zip(trainers, hooks, strict=True)):
        key = stack_key(trainer) if limit != 0 else None
        groups.setdefault((hook, key) if key is not None else (hook, "alone", index), []).append(trainer)
    units = []
    for (hook, *_), members in groups.items():
        start = 0
        for size in stack_sizes(len(members), members[0].cfg.batch_size, members[0].sae.d_sae, limit):
            chunk = members[start : start + size]
            units.append((hook, TopKStack(chunk) if size > 1 else chunk[0]))
            start += size
    return units
