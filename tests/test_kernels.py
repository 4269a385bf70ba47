"""The sparse fast paths (saelab.kernels) against independent references: explicit float64 loops and dense
[B, n] formulas. GPU tests run the same checks on CUDA and are skipped without it."""

from __future__ import annotations

import pytest
import torch

from saelab.kernels import (
    SlotPlan,
    accumulate_rows,
    dead_topk,
    default_group_size,
    gather_dot,
    sparse_decode,
    sparse_decode_groups,
    sparse_encoder_values,
    topk_select,
)
from saelab.sae.base import TrainContext
from saelab.sae.losses import dead_residual_loss
from saelab.sae.topk import TopKConfig, TopKSAE

f64 = torch.float64
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def dense_codes(values: torch.Tensor, indices: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n] matrix with values added at indices (duplicates add up)."""
    return torch.zeros(values.shape[0], n, dtype=values.dtype, device=values.device).scatter_add(
        1, indices, values
    )


# ----------------------------------------------------------------------------------------- row primitives
def test_accumulate_rows_matches_loop_with_duplicate_indices() -> None:
    gen = torch.Generator().manual_seed(0)
    B, K, n, d = 13, 5, 7, 4  # n < B * K: many latents repeat, some never appear
    indices = torch.randint(0, n, (B, K), generator=gen)
    weights, rows = torch.randn(B, K, generator=gen, dtype=f64), torch.randn(B, d, generator=gen, dtype=f64)
    expected = torch.zeros(n, d, dtype=f64)
    for b in range(B):
        for j in range(K):
            expected[indices[b, j]] += weights[b, j] * rows[b]
    torch.testing.assert_close(accumulate_rows(SlotPlan(indices, n), weights, rows), expected)


def test_accumulate_rows_with_explicit_source_rows() -> None:
    gen = torch.Generator().manual_seed(11)
    B, K, n, d, R = 5, 4, 6, 3, 7
    indices, source = torch.randint(0, n, (B, K), generator=gen), torch.randint(0, R, (B, K), generator=gen)
    weights, rows = torch.randn(B, K, generator=gen, dtype=f64), torch.randn(R, d, generator=gen, dtype=f64)
    expected = torch.zeros(n, d, dtype=f64)
    for b in range(B):
        for j in range(K):
            expected[indices[b, j]] += weights[b, j] * rows[source[b, j]]
    torch.testing.assert_close(accumulate_rows(SlotPlan(indices, n), weights, rows, source), expected)


def test_gather_dot_matches_loop() -> None:
    gen = torch.Generator().manual_seed(1)
    B, K, n, d = 6, 3, 10, 5
    indices = torch.randint(0, n, (B, K), generator=gen)
    table, rows = torch.randn(n, d, generator=gen, dtype=f64), torch.randn(B, d, generator=gen, dtype=f64)
    expected = torch.tensor(
        [[float(table[indices[b, j]] @ rows[b]) for j in range(K)] for b in range(B)], dtype=f64
    )
    torch.testing.assert_close(gather_dot(indices, table, rows), expected)


# ---------------------------------------------------------------------------------------------- decoder
def check_sparse_decode(device: str, dtype: torch.dtype, atol: float) -> None:
    gen = torch.Generator().manual_seed(2)
    B, K, n, d = 9, 4, 12, 6
    indices = torch.randint(0, n, (B, K), generator=gen).to(device)
    values = torch.randn(B, K, generator=gen, dtype=f64).to(device, dtype).requires_grad_()
    weight = torch.randn(n, d, generator=gen, dtype=f64).to(device, dtype).requires_grad_()
    bias = torch.randn(d, generator=gen, dtype=f64).to(device, dtype).requires_grad_()
    upstream = torch.randn(B, d, generator=gen, dtype=f64).to(device, dtype)
    out = sparse_decode(values, indices, weight, bias)
    (out * upstream).sum().backward()

    ref = [t.detach().double().cpu().requires_grad_() for t in (values, weight, bias)]
    expected = dense_codes(ref[0], indices.cpu(), n) @ ref[1] + ref[2]  # dense z @ W_dec + b_dec
    (expected * upstream.double().cpu()).sum().backward()
    torch.testing.assert_close(out.double().cpu(), expected, atol=atol, rtol=atol)
    for fast, slow in zip((values, weight, bias), ref, strict=True):
        torch.testing.assert_close(fast.grad.double().cpu(), slow.grad, atol=atol, rtol=atol)


def test_sparse_decode_matches_dense_decoder() -> None:
    check_sparse_decode("cpu", f64, 1e-12)


def test_sparse_decode_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same \\[batch, K\\] shape"):
        sparse_decode(torch.ones(2, 3), torch.zeros(2, 4, dtype=torch.long), torch.ones(5, 2))
    with pytest.raises(ValueError, match="must add up to the codes' width K=4"):
        sparse_decode_groups(torch.ones(2, 4), torch.zeros(2, 4, dtype=torch.long), torch.ones(5, 2), (1, 2))


def test_grouped_decode_matches_separate_dense_decodes_and_shares_one_sort() -> None:
    """Columns [0, 3) and [3, 8) decoded as two outputs: values, all gradients, and a single slot sort."""
    gen = torch.Generator().manual_seed(12)
    B, n, d, sizes = 7, 10, 4, (3, 5)
    indices = torch.randint(0, n, (B, sum(sizes)), generator=gen)
    values = torch.randn(B, sum(sizes), generator=gen, dtype=f64, requires_grad=True)
    weight = torch.randn(n, d, generator=gen, dtype=f64, requires_grad=True)
    upstream = torch.randn(B, 2, d, generator=gen, dtype=f64)
    plan = SlotPlan(indices, n)
    out = sparse_decode_groups(values, indices, weight, sizes, plan)
    out.mul(upstream).sum().backward()
    order = plan.sorted()[0]  # sorted by the backward
    accumulate_rows(plan, values.detach(), torch.ones(B, d, dtype=f64))  # a second user of the plan
    assert plan.sorted()[0] is order  # ... reuses that sort
    assert torch.equal(indices.flatten()[order], indices.flatten().sort().values)

    ref_values, ref_weight = (
        values.detach().clone().requires_grad_(),
        weight.detach().clone().requires_grad_(),
    )
    parts = [(0, sizes[0]), (sizes[0], sum(sizes))]
    expected = torch.stack(
        [dense_codes(ref_values[:, a:b], indices[:, a:b], n) @ ref_weight for a, b in parts], dim=1
    )
    expected.mul(upstream).sum().backward()
    torch.testing.assert_close(out, expected.detach())
    torch.testing.assert_close(values.grad, ref_values.grad)
    torch.testing.assert_close(weight.grad, ref_weight.grad)


# ---------------------------------------------------------------------------------------------- encoder
def check_sparse_encoder(device: str, dtype: torch.dtype, atol: float) -> None:
    """Selected-value gradients equal dense autograd through pre -> top-k -> ReLU, incl. zeroed slots."""
    gen = torch.Generator().manual_seed(3)
    B, d, n, K = 8, 5, 16, 4
    params = [torch.randn(*s, generator=gen, dtype=f64) for s in ((B, d), (d, n), (n,), (d,))]
    params[2] -= 4.0  # push some selected pre-activations below zero, so ReLU zeroes their slots
    x, W_enc, b_enc, b_dec = (p.to(device, dtype).clone().requires_grad_() for p in params)
    upstream = torch.randn(B, K, generator=gen, dtype=f64)
    with torch.no_grad():
        values, indices = ((x - b_dec) @ W_enc + b_enc).topk(K, dim=-1)
        values = values.relu()
    assert (values == 0).any() and (values > 0).any()
    codes = sparse_encoder_values(values, indices, x, W_enc, b_enc, b_dec)
    (codes * upstream.to(device, dtype)).sum().backward()

    ref = [p.clone().requires_grad_() for p in params]
    pre = (ref[0] - ref[3]) @ ref[1] + ref[2]
    ref_values = pre.gather(1, indices.cpu()).relu()
    torch.testing.assert_close(codes.double().cpu(), ref_values.detach(), atol=atol, rtol=atol)
    (ref_values * upstream).sum().backward()
    for fast, slow in zip((x, W_enc, b_enc, b_dec), ref, strict=True):
        torch.testing.assert_close(fast.grad.double().cpu(), slow.grad, atol=atol, rtol=atol)


def test_sparse_encoder_gradients_match_dense_autograd() -> None:
    check_sparse_encoder("cpu", f64, 1e-12)


# -------------------------------------------------------------------------------------------- selection
@pytest.mark.parametrize(
    ("n", "k", "group_size"), [(64, 4, 8), (64, 4, 4), (48, 6, 2), (1024, 32, None), (16384, 8, None)]
)  # 16384 / 8: the group maxima are selected by a second grouped level (2048 -> 256)
def test_grouped_topk_selects_the_true_top_k(n: int, k: int, group_size: int | None) -> None:
    gen = torch.Generator().manual_seed(n + k)
    pre = torch.randn(32, n, generator=gen, dtype=f64)
    pre[0, : n // 2] = -torch.inf  # a row with many ties at -inf
    pre[1] = 0.0  # a row of exact ties
    values, indices = topk_select(pre, k, group_size)
    expected = pre.sort(dim=-1, descending=True).values[:, :k]
    torch.testing.assert_close(values.sort(dim=-1, descending=True).values, expected)
    torch.testing.assert_close(pre.gather(1, indices), values)
    assert all(row.unique().numel() == k for row in indices)


def test_default_group_size_only_groups_wide_rows() -> None:
    assert default_group_size(512, 8) == 1  # narrow: plain torch.topk
    assert default_group_size(8192, 32) == 8
    assert default_group_size(8192, 512) == 4  # 8192 / 8 < 4 * 512
    assert default_group_size(1031, 4) == 1  # prime width: no group size divides it


def test_topk_select_rejects_bad_group_size() -> None:
    with pytest.raises(ValueError, match="group_size=5"):
        topk_select(torch.randn(2, 64), 4, group_size=5)


def test_grouped_topk_is_differentiable_like_torch_topk() -> None:
    pre = torch.randn(4, 64, dtype=f64, requires_grad=True)
    values, indices = topk_select(pre, 4, group_size=8)
    values.sum().backward()
    expected = torch.zeros_like(pre).scatter(1, indices, 1.0)
    torch.testing.assert_close(pre.grad, expected)


@pytest.mark.parametrize("dead_fraction", [0.2, 0.8, 0.02])  # column subset, masked, and fewer than k dead
def test_dead_topk_matches_masked_topk(dead_fraction: float) -> None:
    gen = torch.Generator().manual_seed(4)
    n, k = 256, 8
    pre = torch.randn(16, n, generator=gen, dtype=f64)
    dead = torch.rand(n, generator=gen) < dead_fraction
    expected = pre.masked_fill(~dead, -torch.inf).sort(dim=-1, descending=True).values[:, :k]
    values, indices = dead_topk(pre.clone(), dead, k)
    torch.testing.assert_close(values.sort(dim=-1, descending=True).values, expected)
    finite = values.isfinite()
    assert dead[indices[finite]].all()
    assert finite.sum(dim=1).eq(min(k, int(dead.sum()))).all()


# ------------------------------------------------------------------------------ TopK SAE training pass
def reference_topk_loss(sae: TopKSAE, x: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """Gao et al.'s TopK + AuxK loss with dense float64 codes: z = scatter(ReLU(topk(pre))), x_hat = z W + b."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    values, indices = pre.topk(sae.cfg.k, dim=-1)
    x_hat = dense_codes(values.relu(), indices, sae.d_sae) @ sae.W_dec + sae.b_dec
    fvu = (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    if not dead.any():
        return fvu
    aux_values, aux_indices = pre.masked_fill(~dead, -torch.inf).topk(sae.aux_k, dim=-1)
    residual = (x - x_hat).detach()
    residual_hat = dense_codes(aux_values.relu(), aux_indices, sae.d_sae) @ sae.W_dec
    aux = (residual - residual_hat).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum()
    return fvu + sae.cfg.aux_k_coef * min(float(dead.sum()) / sae.aux_k, 1.0) * aux


def random_topk_sae(d: int = 12, n: int = 96, k: int = 4, aux_k: int = 6, seed: int = 5) -> TopKSAE:
    torch.manual_seed(seed)
    sae = TopKSAE(TopKConfig(d_in=d, d_sae=n, k=k, aux_k=aux_k, dtype="float64"))
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
        sae.b_enc.normal_(std=0.5)
        sae.b_dec.normal_()
    return sae


@pytest.mark.parametrize("dead_fraction", [0.0, 0.3, 0.7])
def test_topk_training_forward_matches_dense_reference(dead_fraction: float) -> None:
    sae = random_topk_sae()
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(24, sae.d_in, generator=gen, dtype=f64)
    dead = torch.rand(sae.d_sae, generator=gen) < dead_fraction
    out = sae.training_forward(x, TrainContext(0, 10, dead, bool(dead.any())))
    out.loss.backward()
    fast = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()
    expected = reference_topk_loss(sae, x, dead)
    expected.backward()
    torch.testing.assert_close(out.loss, expected.detach())
    for name, p in sae.named_parameters():
        torch.testing.assert_close(fast[name], p.grad, msg=lambda m, name=name: f"grad {name}: {m}")
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    top = pre.topk(sae.cfg.k, dim=-1)
    positive = top.values > 0
    expected_fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    expected_fired[top.indices[positive]] = True
    assert torch.equal(out.fired, expected_fired)
    assert out.l0.item() == pytest.approx(positive.sum().item() / x.shape[0])


@pytest.mark.parametrize("n_dead", [3, 40])
def test_dead_residual_loss_is_gaos_scaled_residual_fvu(n_dead: int) -> None:
    """AuxK / MP revival: min(n_dead / aux_k, 1) * FVU of the residual, with its gradient, in float64."""
    gen = torch.Generator().manual_seed(8)
    residual = torch.randn(10, 6, generator=gen, dtype=f64)
    rebuilt = torch.randn(10, 6, generator=gen, dtype=f64, requires_grad=True)
    dead_residual_loss(residual, rebuilt, torch.tensor(float(n_dead), dtype=f64), 8).backward()
    fast = rebuilt.grad.clone()
    rebuilt.grad = None
    scale = min(n_dead / 8, 1.0)
    rows = [((residual[b] - rebuilt[b]) ** 2).sum() for b in range(10)]
    mean = residual.sum(dim=0) / 10
    denominator = sum(((residual[b] - mean) ** 2).sum() for b in range(10))
    expected = scale * sum(rows) / denominator
    expected.backward()
    torch.testing.assert_close(fast, rebuilt.grad)


def test_bf16_autocast_training_forward_is_close_to_float32() -> None:
    sae = random_topk_sae(d=16, n=64, k=4, seed=9).float()
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(10))
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:20] = True
    ctx = TrainContext(0, 10, dead, True)
    reference = sae.training_forward(x, ctx)
    reference.loss.backward()
    ref_grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae.training_forward(x, ctx)
    out.loss.backward()
    torch.testing.assert_close(out.loss, reference.loss, atol=0.02, rtol=0.02)
    for name, p in sae.named_parameters():
        assert p.grad.dtype == torch.float32, name  # float32 master weights get float32 gradients
        scale = ref_grads[name].abs().max()
        assert (p.grad - ref_grads[name]).abs().max() <= 0.05 * scale, name


def test_cpu_selection_buffer_is_reused_and_not_saved() -> None:
    sae = random_topk_sae()
    x = torch.randn(8, sae.d_in, dtype=f64)
    first = sae.selection_pre_activations(x)
    second = sae.selection_pre_activations(2 * x)
    assert first.data_ptr() == second.data_ptr()
    torch.testing.assert_close(second, sae.pre_activations(2 * x).detach())
    assert set(sae.state_dict()) == {"W_enc", "b_enc", "W_dec", "b_dec"}


# ------------------------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@CUDA
def test_kernels_on_cuda_match_float64_reference() -> None:
    check_sparse_decode("cuda", torch.float32, 1e-4)
    check_sparse_encoder("cuda", torch.float32, 1e-4)
    pre = torch.randn(64, 8192, device="cuda")
    values, _ = topk_select(pre, 32)
    torch.testing.assert_close(values.sort(dim=-1).values, pre.topk(32, dim=-1).values.sort(dim=-1).values)


@pytest.mark.gpu
@CUDA
def test_cuda_training_forward_matches_cpu() -> None:
    sae = random_topk_sae(seed=11)
    x = torch.randn(24, sae.d_in, dtype=f64)
    dead = torch.rand(sae.d_sae) < 0.3
    cpu_loss = sae.training_forward(x, TrainContext(0, 10, dead, True)).loss
    gpu = sae.to("cuda")
    gpu_loss = gpu.training_forward(x.cuda(), TrainContext(0, 10, dead.cuda(), True)).loss
    torch.testing.assert_close(gpu_loss.cpu(), cpu_loss.detach())
