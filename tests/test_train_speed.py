"""Trainer speed paths: fused Adam, bf16 autocast, torch.compile, no host syncs in a step, and end-to-end
equality of training with the sparse kernels versus the plain dense-autograd TopK step."""

from __future__ import annotations

import functools

import pytest
import torch

from saelab.sae.reference import plain_topk_training_forward
from saelab.sae.topk import TopKConfig, TopKSAE
from saelab.sources.synthetic import SyntheticConfig, SyntheticSource
from saelab.train.config import TrainerConfig
from saelab.train.trainer import Trainer

D_IN, D_SAE, BATCH = 16, 64, 32


def make_trainer(dtype: str = "float64", steps: int = 12, **overrides: object) -> Trainer:
    torch.manual_seed(0)
    sae = TopKSAE(TopKConfig(d_in=D_IN, d_sae=D_SAE, k=4, aux_k=8, dtype=dtype))
    cfg = TrainerConfig(
        total_tokens=steps * BATCH,
        batch_size=BATCH,
        device="cpu",
        dead_window_tokens=3 * BATCH,  # latents die within the run, so AuxK is exercised
        dead_check_every=1,
        log_every=1000,
        lr=3e-3,
        **overrides,
    )
    return Trainer(sae, cfg)


def source() -> SyntheticSource:
    return SyntheticSource(SyntheticConfig(d_in=D_IN, n_features=48, mean_active=3))


def test_kernel_training_equals_plain_autograd_training() -> None:
    """Same data, init and optimizer: the sparse step and the dense step give the same weights."""
    fast, plain = make_trainer(), make_trainer()
    plain.forward = functools.partial(plain_topk_training_forward, plain.sae)
    fast_result, plain_result = fast.fit(source()), plain.fit(source())
    assert fast_result.dead_fraction > 0  # AuxK was active for part of the run
    assert fast_result.dead_fraction == plain_result.dead_fraction
    for name, weight in fast_result.sae.state_dict().items():
        torch.testing.assert_close(weight, plain_result.sae.state_dict()[name], atol=1e-9, rtol=1e-9)


def test_adam_is_fused_on_cpu() -> None:
    assert make_trainer().optimizer.defaults["fused"] is True


def test_autocast_dtype_is_validated() -> None:
    with pytest.raises(ValueError, match="trainer.autocast_dtype='float16'"):
        TrainerConfig(autocast_dtype="float16").validate()
    with pytest.raises(ValueError, match="float32 master weights.*sae.dtype=float32"):
        make_trainer(dtype="float64", autocast_dtype="bfloat16")


def test_bf16_autocast_training_runs_with_float32_master_weights() -> None:
    trainer = make_trainer(dtype="float32", steps=6, autocast_dtype="bfloat16")
    result = trainer.fit(source())
    assert all(p.dtype == torch.float32 for p in trainer.sae.parameters())
    assert all(s["exp_avg"].dtype == torch.float32 for s in trainer.optimizer.state.values())
    assert 0 < result.history[-1]["fvu"] < 1.5


def test_compile_wraps_the_training_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """trainer.compile routes the step through torch.compile (eager backend here, to keep CI fast)."""
    calls = []
    real_compile = torch.compile

    def eager_compile(fn, **kwargs):  # noqa: ANN001, ANN003
        calls.append(fn)
        return real_compile(fn, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", eager_compile)
    compiled, eager = make_trainer(steps=2, compile=True), make_trainer(steps=2)
    assert calls == [compiled.sae.training_forward]
    compiled_result, eager_result = compiled.fit(source()), eager.fit(source())
    for name, weight in compiled_result.sae.state_dict().items():
        torch.testing.assert_close(weight, eager_result.sae.state_dict()[name])


def test_train_step_makes_no_host_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """A step never pulls a value to the host (on CUDA each would be a device sync)."""
    trainer = make_trainer(dtype="float32")
    batches = source().batches(BATCH)
    trainer.prepare(next(batches))
    trainer.train_step(next(batches))
    trainer.any_dead = True  # take the AuxK path too

    def forbidden(*_args: object) -> None:
        raise AssertionError("host read inside train_step")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    out = trainer.train_step(next(batches))
    monkeypatch.undo()
    assert torch.isfinite(out.loss)
    assert trainer.step == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_train_step_has_no_device_sync() -> None:
    torch.manual_seed(0)
    sae = TopKSAE(TopKConfig(d_in=64, d_sae=1024, k=8))
    cfg = TrainerConfig(total_tokens=100 * 256, batch_size=256, device="cuda", autocast_dtype="bfloat16")
    trainer = Trainer(sae, cfg)
    batches = [b.cuda() for b, _ in zip(source_batches(64), range(4), strict=False)]
    trainer.prepare(batches[0])
    trainer.any_dead = True
    trainer.train_step(batches[1])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batches[2:]:
            trainer.train_step(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def source_batches(d_in: int):  # noqa: ANN201
    return SyntheticSource(SyntheticConfig(d_in=d_in, n_features=256, mean_active=4)).batches(256)


def test_topk_init_scales_the_encoder_to_the_least_squares_fit() -> None:
    """After initialize_from_sample the TopK reconstruction's residual is orthogonal to the reconstruction
    (the scale is least-squares optimal) and the selected latents are those of the unscaled encoder."""
    torch.manual_seed(1)
    sae = TopKSAE(TopKConfig(d_in=D_IN, d_sae=D_SAE, k=4, dtype="float64"))
    x = source().batch(0, 256).double()
    super(TopKSAE, sae).initialize_from_sample(x)  # the base init alone: b_dec, unit-norm tied encoder
    before = sae.pre_activations(x).topk(4, dim=-1).indices.sort(dim=-1).values
    sae.initialize_from_sample(x)
    sae.requires_grad_(False)
    pre = sae.pre_activations(x)
    values, indices = pre.topk(4, dim=-1)
    assert torch.equal(indices.sort(dim=-1).values, before)
    codes = torch.zeros_like(pre).scatter(1, indices, values.relu())
    centred, x_hat = x - sae.b_dec, codes @ sae.W_dec
    assert abs(float(((centred - x_hat) * x_hat).sum())) < 1e-9 * float(x_hat.pow(2).sum())
    scale = sae.W_enc.norm(dim=0)  # all encoder columns share the fitted scale (decoder rows are unit norm)
    torch.testing.assert_close(scale, scale[:1].expand_as(scale))
    assert 0 < scale[0] < 1  # unit-norm tied weights overshoot
