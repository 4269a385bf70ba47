"""The Triton sparse kernels (saelab.kernels.triton_rows, via the backend switch) against dense float64
references, for values and gradients, at skewed hit patterns: one latent in every row, every row on the same
latents, most slots on two latents, latents never hit. Without CUDA they run under Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1) at tiny shapes; the `gpu` tests repeat them on CUDA, larger."""

from __future__ import annotations

import pytest
import torch

from saelab.kernels import SlotPlan, sparse_decode_groups, sparse_encoder_values
from saelab.kernels.auxk import dead_latent_list
from saelab.kernels.backend import override, sparse_backend
from saelab.sae.base import TrainContext
from saelab.sae.batchtopk import BatchTopKConfig, BatchTopKSAE
from saelab.sae.reference import plain_topk_training_forward
from saelab.sae.topk import TopKConfig, TopKSAE

triton = pytest.importorskip("triton")
f64 = torch.float64
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")
PATTERNS = ("random", "one_latent_in_every_row", "same_latents_in_every_row", "two_hot_latents")


def hit_pattern(pattern: str, B: int, K: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """indices [B, K] into n latents, distinct within a row; latents n - 2 and n - 1 are never hit."""

    def draw(count: int, low: int) -> torch.Tensor:  # `count` distinct latents per row from [low, n - 2)
        return torch.stack([torch.randperm(n - 2 - low, generator=gen)[:count] + low for _ in range(B)])

    if pattern == "one_latent_in_every_row":  # latent 0 in every row
        return torch.cat([torch.zeros(B, 1, dtype=torch.long), draw(K - 1, 1)], dim=1)
    if pattern == "same_latents_in_every_row":
        return draw(K, 0)[:1].expand(B, K).clone()
    if pattern == "two_hot_latents":  # latents 0 and 1 in every row
        return torch.cat([torch.tensor([[0, 1]]).expand(B, 2), draw(K - 2, 2)], dim=1)
    return draw(K, 0)


def dense_codes(values: torch.Tensor, indices: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(values.shape[0], n, dtype=values.dtype).scatter_add(1, indices, values)


def check_decode(device: str, pattern: str, B: int, K: int, n: int, d: int, sizes: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(PATTERNS.index(pattern))
    indices = hit_pattern(pattern, B, sum(sizes), n, gen)
    values = torch.randn(B, sum(sizes), generator=gen, dtype=f64)
    weight = torch.randn(n, d, generator=gen, dtype=f64)
    upstream = torch.randn(B, len(sizes), d, generator=gen, dtype=f64)
    fast_values, fast_weight = (t.float().to(device).requires_grad_() for t in (values, weight))
    dev_indices = indices.to(device)
    out = sparse_decode_groups(fast_values, dev_indices, fast_weight, sizes, SlotPlan(dev_indices, n))
    (out * upstream.float().to(device)).sum().backward()

    ref_values, ref_weight = values.clone().requires_grad_(), weight.clone().requires_grad_()
    bounds = [0, sizes[0], sum(sizes)][: len(sizes) + 1]
    expected = torch.stack(
        [
            dense_codes(ref_values[:, a:b], indices[:, a:b], n) @ ref_weight
            for a, b in zip(bounds, bounds[1:], strict=False)
        ],
        1,
    )
    (expected * upstream).sum().backward()
    tol = dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.double().cpu(), expected.detach(), **tol)
    torch.testing.assert_close(fast_values.grad.double().cpu(), ref_values.grad, **tol)
    torch.testing.assert_close(fast_weight.grad.double().cpu(), ref_weight.grad, **tol)


def check_encoder(device: str, pattern: str, B: int, K: int, n: int, d: int) -> None:
    """Gradients through the kept codes equal dense autograd through pre -> gather -> ReLU."""
    gen = torch.Generator().manual_seed(10 + PATTERNS.index(pattern))
    indices = hit_pattern(pattern, B, K, n, gen)
    params = [torch.randn(*s, generator=gen, dtype=f64) for s in ((B, d), (d, n), (n,), (d,))]
    params[2] -= 1.0  # some kept pre-activations below zero: ReLU zeroes those slots
    upstream = torch.randn(B, K, generator=gen, dtype=f64)
    x, W_enc, b_enc, b_dec = (p.float().to(device).requires_grad_() for p in params)
    with torch.no_grad():
        values = ((x - b_dec) @ W_enc + b_enc).gather(1, indices.to(device)).relu()
    codes = sparse_encoder_values(values, indices.to(device), x, W_enc, b_enc, b_dec)
    (codes * upstream.float().to(device)).sum().backward()

    ref = [p.clone().requires_grad_() for p in params]
    ((((ref[0] - ref[3]) @ ref[1] + ref[2]).gather(1, indices).relu()) * upstream).sum().backward()
    for fast, slow in zip((x, W_enc, b_enc, b_dec), ref, strict=True):
        torch.testing.assert_close(fast.grad.double().cpu(), slow.grad, atol=1e-4, rtol=1e-4)


def random_sae(cls: type, cfg: TopKConfig, seed: int) -> TopKSAE:
    torch.manual_seed(seed)
    sae = cls(cfg)
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
        sae.b_enc.normal_(std=0.5)
        sae.b_dec.normal_()
    return sae


def check_topk_training(
    device: str, B: int, d: int, n: int, k: int, aux_k: int, dead_fraction: float
) -> None:
    """TopK training pass (TopK codes + AuxK over a dead-latent list) equals plain dense autograd."""
    sae = random_sae(TopKSAE, TopKConfig(d_in=d, d_sae=n, k=k, aux_k=aux_k), seed=3).to(device)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(B, d, generator=gen).to(device)
    dead = (torch.rand(n, generator=gen) < dead_fraction).to(device)
    ctx = TrainContext(0, 10, dead, True, dead_latent_list(dead))
    out = sae.training_forward(x, ctx)
    out.loss.backward()
    fast = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()
    expected = plain_topk_training_forward(sae, x, TrainContext(0, 10, dead, True))
    expected.loss.backward()
    torch.testing.assert_close(out.loss, expected.loss.detach(), atol=1e-5, rtol=1e-4)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(
            fast[name], p.grad, atol=1e-4, rtol=1e-3, msg=lambda m, name=name: f"{name}: {m}"
        )


# ------------------------------------------------------------------------- CPU, Triton's interpreter
interpreted = pytest.mark.skipif(CUDA, reason="interpreter tests run where CUDA is absent; see the gpu tests")


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Chunks of 8 sorted slots, so that the tiny interpreted shapes split a latent's slots over several
    programs (as B * K / 64 programs do at real shapes); counts the Triton kernel calls."""
    from saelab.kernels import triton_rows

    monkeypatch.setattr(triton_rows, "CHUNK", 8)
    calls = dict.fromkeys(("decode_rows", "gather_dot", "segment_accumulate"), 0)

    def spy(name: str) -> object:
        kernel = getattr(triton_rows, name)

        def counted(*args: object) -> torch.Tensor:
            calls[name] += 1
            return kernel(*args)

        return counted

    for name in calls:
        monkeypatch.setattr(triton_rows, name, spy(name))
    return calls


@interpreted
def test_backend_switch_picks_torch_on_cpu_and_triton_only_when_forced() -> None:
    assert sparse_backend(torch.device("cpu")) == "torch"
    with override(SAELAB_SPARSE_BACKEND="triton"):
        assert sparse_backend(torch.device("cpu")) == "triton"
    with pytest.raises(ValueError, match="SAELAB_AUXK"), override(SAELAB_AUXK="fast"):
        pass
    assert sparse_backend(torch.device("cpu")) == "torch"  # the override ended


@interpreted
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("sizes", [(4,), (3, 5)])
def test_triton_decode_matches_dense_reference(
    pattern: str, sizes: tuple[int, ...], small_chunks: dict[str, int]
) -> None:
    with override(SAELAB_SPARSE_BACKEND="triton"):
        check_decode("cpu", pattern, B=20, K=sum(sizes), n=16, d=20, sizes=sizes)
    assert small_chunks == {"decode_rows": 1, "gather_dot": 1, "segment_accumulate": 1}


@interpreted
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("encoder_grad", ["sparse", "dense"])
def test_triton_encoder_gradient_matches_dense_autograd(
    pattern: str, encoder_grad: str, small_chunks: dict[str, int]
) -> None:
    with override(SAELAB_SPARSE_BACKEND="triton", SAELAB_ENCODER_GRAD=encoder_grad):
        check_encoder("cpu", pattern, B=20, K=4, n=16, d=18)
    assert small_chunks["segment_accumulate"] == (encoder_grad == "sparse")


@interpreted
@pytest.mark.parametrize("auxk", ["dense", "sparse"])
def test_triton_topk_training_matches_reference(auxk: str, small_chunks: dict[str, int]) -> None:
    with override(SAELAB_SPARSE_BACKEND="triton", SAELAB_AUXK=auxk):
        check_topk_training("cpu", B=16, d=12, n=48, k=4, aux_k=6, dead_fraction=0.3)
    assert small_chunks == {"decode_rows": 1, "gather_dot": 1, "segment_accumulate": 2}


@interpreted
def test_triton_batchtopk_training_matches_torch_path(small_chunks: dict[str, int]) -> None:
    """BatchTopK runs the same kernels: the Triton and torch backends agree on loss and gradients."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(16, 10, generator=gen)
    dead = torch.rand(40, generator=gen) < 0.25
    ctx = TrainContext(0, 10, dead, True, dead_latent_list(dead))
    results = []
    for backend in ("torch", "triton"):
        sae = random_sae(BatchTopKSAE, BatchTopKConfig(d_in=10, d_sae=40, k=3, aux_k=5), seed=6)
        with override(SAELAB_SPARSE_BACKEND=backend, SAELAB_AUXK="sparse"):
            out = sae.training_forward(x, ctx)
            out.loss.backward()
        results.append((out.loss.detach(), {name: p.grad for name, p in sae.named_parameters()}))
    (loss_torch, grads_torch), (loss_triton, grads_triton) = results
    assert small_chunks == {"decode_rows": 1, "gather_dot": 1, "segment_accumulate": 2}
    torch.testing.assert_close(loss_triton, loss_torch)
    for name, grad in grads_torch.items():
        torch.testing.assert_close(grads_triton[name], grad, atol=1e-5, rtol=1e-4)


def check_rows_dtype(
    monkeypatch: pytest.MonkeyPatch, device: str, rows: str, B: int, K: int, n: int, d: int
) -> dict[str, set[torch.dtype]]:
    """Encoder values -> decode under bf16 autocast with SAELAB_SPARSE_ROWS=rows, against float64 dense
    autograd at bf16 rounding; returns the dtypes of the tables and rows each Triton kernel was handed."""
    from saelab.kernels import triton_rows

    gen = torch.Generator().manual_seed(21)
    indices = hit_pattern("two_hot_latents", B, K, n, gen)
    params = [torch.randn(*s, generator=gen, dtype=f64) for s in ((B, d), (d, n), (n,), (d,), (n, d))]
    upstream = torch.randn(B, d, generator=gen, dtype=f64)
    x, W_enc, b_enc, b_dec, W_dec = (p.float().to(device).requires_grad_() for p in params)
    seen: dict[str, set[torch.dtype]] = {
        "decode_rows": set(),
        "gather_dot": set(),
        "segment_accumulate": set(),
    }
    kernels = {name: getattr(triton_rows, name) for name in seen}

    def spy(name: str, *tensors: int) -> object:
        def recorded(*args: torch.Tensor) -> torch.Tensor:
            seen[name].update(args[i].dtype for i in tensors)
            return kernels[name](*args)

        return recorded

    spies = {
        "decode_rows": (2,),
        "gather_dot": (1, 2),
        "segment_accumulate": (3,),
    }  # positions of row tensors
    for name, tensors in spies.items():
        monkeypatch.setattr(triton_rows, name, spy(name, *tensors))
    with override(SAELAB_SPARSE_BACKEND="triton", SAELAB_SPARSE_ROWS=rows):
        dev_indices = indices.to(device)
        with torch.autocast(device, dtype=torch.bfloat16):
            pre = (x - b_dec) @ W_enc + b_enc
            values = pre.detach().gather(1, dev_indices).relu()
            codes = sparse_encoder_values(values, dev_indices, x, W_enc, b_enc, b_dec)
            out = sparse_decode_groups(codes, dev_indices, W_dec, (K,))[:, 0]
        (out.float() * upstream.float().to(device)).sum().backward()
    ref = [p.clone().requires_grad_() for p in params]
    ref_codes = ((ref[0] - ref[3]) @ ref[1] + ref[2]).gather(1, indices).relu()
    ref_out = dense_codes(ref_codes, indices, n) @ ref[4]
    (ref_out * upstream).sum().backward()
    pairs = [(out.detach(), ref_out.detach())]
    for fast, slow in zip((x, W_enc, b_enc, b_dec, W_dec), ref, strict=True):
        assert fast.grad.dtype == torch.float32  # master gradients stay float32
        pairs.append((fast.grad, slow.grad))
    for fast, slow in pairs:  # within 3% of each tensor's largest entry: bf16 rounding of sums
        scale = slow.abs().max()
        torch.testing.assert_close(fast.double().cpu() / scale, slow / scale, atol=0.03, rtol=0)
    return seen


@interpreted
@pytest.mark.parametrize("rows", ["float32", "autocast"])
def test_triton_rows_dtype_under_autocast(rows: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """SAELAB_SPARSE_ROWS=autocast: under bf16 autocast the kernels gather bfloat16 decoder, gradient and input
    rows (float32 otherwise); values and float32 gradients match float64 dense autograd to bf16 rounding."""
    seen = check_rows_dtype(monkeypatch, "cpu", rows, B=24, K=5, n=20, d=16)
    expected = torch.bfloat16 if rows == "autocast" else torch.float32
    assert seen == {name: {expected} for name in seen}


# ------------------------------------------------------------------------------------------------ CUDA
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("pattern", PATTERNS)
def test_cuda_triton_kernels_match_dense_reference(pattern: str) -> None:
    assert sparse_backend(torch.device("cuda")) == "triton"
    check_decode("cuda", pattern, B=512, K=48, n=300, d=200, sizes=(16, 32))
    check_decode("cuda", pattern, B=512, K=48, n=300, d=200, sizes=(48,))
    for encoder_grad in ("sparse", "dense"):
        with override(SAELAB_ENCODER_GRAD=encoder_grad):
            check_encoder("cuda", pattern, B=512, K=32, n=300, d=130)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("rows", ["float32", "autocast"])
def test_cuda_rows_dtype_under_autocast(rows: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = check_rows_dtype(monkeypatch, "cuda", rows, B=512, K=32, n=300, d=130)
    expected = torch.bfloat16 if rows == "autocast" else torch.float32
    assert seen == {name: {expected} for name in seen}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("auxk", ["dense", "sparse"])
def test_cuda_topk_training_matches_reference(auxk: str) -> None:
    with override(SAELAB_AUXK=auxk):
        check_topk_training("cuda", B=256, d=64, n=2048, k=16, aux_k=32, dead_fraction=0.2)
        check_topk_training("cuda", B=256, d=64, n=2048, k=16, aux_k=32, dead_fraction=0.003)


@pytest.mark.gpu
@needs_cuda
def test_cuda_topk_step_with_gathered_auxk_makes_no_device_sync() -> None:
    """A bf16 TopK train_step with AuxK over the gathered dead list (and the Triton kernels) never syncs."""
    from saelab.train.config import TrainerConfig
    from saelab.train.trainer import Trainer

    torch.manual_seed(0)
    sae = TopKSAE(TopKConfig(d_in=64, d_sae=2048, k=16))
    trainer = Trainer(
        sae, TrainerConfig(total_tokens=100 * 512, batch_size=512, device="cuda", autocast_dtype="bfloat16")
    )
    batches = [torch.randn(512, 64, generator=torch.Generator().manual_seed(i)).cuda() for i in range(5)]
    trainer.prepare(batches[0])

    def pin_dead() -> None:  # 20% of the latents dead; on random data they would all fire again at once
        trainer.tracker.tokens_since_fired[::5] = trainer.tracker.window

    pin_dead()
    trainer.refresh_dead()
    assert trainer.any_dead and trainer.dead_latents is not None
    trainer.train_step(batches[1])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batches[2:]:
            pin_dead()
            out = trainer.train_step(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.loss) and out.metrics["auxk"] > 0
