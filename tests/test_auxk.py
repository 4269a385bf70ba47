"""AuxK on the gathered dead sub-dictionary (saelab.kernels.auxk) against the plain dense-autograd TopK pass
(saelab.sae.reference), and the bf16 / no-sync properties of the training step."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from saelab.kernels.auxk import dead_latent_list, dead_list_capacity
from saelab.kernels.backend import override
from saelab.sae.base import TrainContext
from saelab.sae.batchtopk import BatchTopKConfig, BatchTopKSAE
from saelab.sae.reference import plain_topk_training_forward
from saelab.sae.topk import TopKConfig, TopKSAE

f64 = torch.float64
D, N, K, AUX_K = 12, 96, 4, 6


def random_sae(cls: type = TopKSAE, cfg: TopKConfig | None = None, seed: int = 0) -> TopKSAE:
    torch.manual_seed(seed)
    sae = cls(cfg or TopKConfig(d_in=D, d_sae=N, k=K, aux_k=AUX_K, dtype="float64"))
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
        sae.b_enc.normal_(std=0.5)
        sae.b_dec.normal_()
    return sae


def dead_mask(count: int, seed: int) -> torch.Tensor:
    mask = torch.zeros(N, dtype=torch.bool)
    mask[torch.randperm(N, generator=torch.Generator().manual_seed(seed))[:count]] = True
    return mask


def loss_and_grads(sae: TopKSAE, out_loss: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out_loss.backward()
    grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()
    return out_loss.detach(), grads


def test_dead_list_is_the_dead_latents_padded_to_a_bucketed_capacity() -> None:
    assert [dead_list_capacity(c) for c in (0, 1, 16, 17, 100, 1000, 1025)] == [
        0,
        16,
        16,
        32,
        112,
        1024,
        1152,
    ]
    for count in range(1, 3000, 37):
        assert count <= dead_list_capacity(count) <= max(count + 15, 1.125 * count)
    mask = dead_mask(7, seed=1)
    latents = dead_latent_list(mask)
    assert latents.shape == (16,)
    assert torch.equal(latents[:7], mask.nonzero().squeeze(1))
    assert (latents[7:] == N).all()
    assert dead_latent_list(torch.zeros(N, dtype=torch.bool)).numel() == 0


# dead counts: fewer than aux_k, between aux_k and 4 aux_k (dense on CPU), above 4 aux_k (sparse on CPU)
@pytest.mark.parametrize("n_dead", [2, 17, 40])
@pytest.mark.parametrize("mode", ["auto", "dense", "sparse"])
def test_topk_auxk_over_the_dead_list_equals_dense_reference(n_dead: int, mode: str) -> None:
    sae = random_sae(seed=n_dead)
    x = torch.randn(20, D, generator=torch.Generator().manual_seed(3), dtype=f64)
    dead = dead_mask(n_dead, seed=n_dead)
    with override(SAELAB_AUXK=mode):
        out = sae.training_forward(x, TrainContext(0, 10, dead, True, dead_latent_list(dead)))
    loss, grads = loss_and_grads(sae, out.loss)
    ref_loss, ref_grads = loss_and_grads(
        sae, plain_topk_training_forward(sae, x, TrainContext(0, 10, dead, True)).loss
    )
    torch.testing.assert_close(loss, ref_loss)
    assert out.metrics["auxk"] > 0
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, msg=lambda m, name=name: f"grad {name}: {m}")


def test_candidates_that_revived_since_the_check_are_left_out() -> None:
    """The list was built when 30 latents were dead; 10 of them fired since: AuxK uses the other 20 only."""
    sae = random_sae(seed=4)
    x = torch.randn(20, D, generator=torch.Generator().manual_seed(5), dtype=f64)
    at_check = dead_mask(30, seed=6)
    now = at_check.clone()
    now[at_check.nonzero().squeeze(1)[:10]] = False
    out = sae.training_forward(x, TrainContext(0, 10, now, True, dead_latent_list(at_check)))
    loss, grads = loss_and_grads(sae, out.loss)
    ref_loss, ref_grads = loss_and_grads(
        sae, plain_topk_training_forward(sae, x, TrainContext(0, 10, now, True)).loss
    )
    torch.testing.assert_close(loss, ref_loss)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad)


def test_batchtopk_auxk_over_the_dead_list_equals_the_masked_path() -> None:
    """BatchTopK's AuxK through the gathered sub-dictionary equals its masked top-k over all latents."""
    cfg = BatchTopKConfig(d_in=D, d_sae=N, k=K, aux_k=AUX_K, dtype="float64")
    x = torch.randn(20, D, generator=torch.Generator().manual_seed(7), dtype=f64)
    dead = dead_mask(17, seed=8)
    results = []
    for latents in (None, dead_latent_list(dead)):
        sae = random_sae(BatchTopKSAE, cfg, seed=9)
        results.append(
            loss_and_grads(sae, sae.training_forward(x, TrainContext(0, 10, dead, True, latents)).loss)
        )
    (masked_loss, masked_grads), (gathered_loss, gathered_grads) = results
    torch.testing.assert_close(gathered_loss, masked_loss)
    for name, grad in masked_grads.items():
        torch.testing.assert_close(gathered_grads[name], grad)


class Float32WideTensors(TorchDispatchMode):
    """Records every op that outputs a float32 tensor with at least `numel` elements."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() >= self.numel:
                self.ops.append(str(func))
        return out


@pytest.mark.parametrize("cls", [TopKSAE, BatchTopKSAE])
@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_bf16_autocast_step_makes_no_float32_pass_over_batch_by_latents(cls: type, mode: str) -> None:
    """Under bf16 autocast, pre-activations, selection and AuxK stay bf16: no float32 tensor of B * n entries
    (forward or backward; the float32 gradients of the [d, n] weights are smaller than B * n here)."""
    B, d, n = 64, 8, 256
    cfg_cls = BatchTopKConfig if cls is BatchTopKSAE else TopKConfig
    sae = random_sae(cls, cfg_cls(d_in=d, d_sae=n, k=4, aux_k=8), seed=10)
    x = torch.randn(B, d, generator=torch.Generator().manual_seed(11))
    dead = torch.zeros(n, dtype=torch.bool)
    dead[::3] = True
    ctx = TrainContext(0, 10, dead, True, dead_latent_list(dead))
    with override(SAELAB_AUXK=mode), Float32WideTensors(B * n) as recorder:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = sae.training_forward(x, ctx)
        out.loss.backward()
    assert out.metrics["auxk"] > 0
    assert recorder.ops == []
