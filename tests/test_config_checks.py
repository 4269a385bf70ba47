"""Bad numbers are refused naming the field and the fix; SAEs take inputs of any leading shape and dtype."""

from __future__ import annotations

import math

import pytest
import torch

import saelab
from saelab.core.device import resolve_device
from saelab.core.seeds import generator
from saelab.sae.batchtopk import BatchTopKConfig
from saelab.sae.gba import GBAConfig
from saelab.sae.jumprelu import JumpReLUConfig
from saelab.sae.mp import MPConfig
from saelab.sae.relu import ReLUConfig
from saelab.sae.topk import TopKConfig
from saelab.sources.synthetic import SyntheticConfig
from saelab.train.config import TrainerConfig

NAN, INF = math.nan, math.inf


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"device": "tpu"}, "trainer.device='tpu' is not a device torch knows; use auto, cpu, cuda"),
        ({"adam_eps": -1.0}, "trainer.adam_eps=-1.0 must be > 0"),
        ({"adam_eps": 0.0}, "trainer.adam_eps=0.0 must be > 0"),
        ({"lr": INF}, "trainer.lr=inf must be > 0 (a finite number)"),
        ({"lr": NAN}, "trainer.lr=nan must be > 0 (a finite number)"),
        ({"grad_clip_norm": NAN}, "trainer.grad_clip_norm=nan must be >= 0 (a finite number). 0 disables"),
        ({"grad_clip_norm": INF}, "trainer.grad_clip_norm=inf must be >= 0 (a finite number)"),
        ({"lr_warmup_frac": NAN}, "trainer.lr_warmup_frac=nan must be in [0, 1]"),
        ({"adam_beta2": NAN}, "trainer.adam_beta2=nan must be in [0, 1)"),
        ({"batch_size": 2.5}, "trainer.batch_size=2.5 must be >= 1 (an integer)"),
        (
            {"total_tokens": 100, "batch_size": 4096},
            "trainer.total_tokens=100 is smaller than one batch (trainer.batch_size=4096)",
        ),
        ({"compile": "no"}, "trainer.compile='no' must be True or False"),  # a non-empty string is truthy
        ({"normalize_activations": 1}, "trainer.normalize_activations=1 must be True or False"),
    ],
)
def test_trainer_settings_are_refused_naming_the_field(overrides, message):
    with pytest.raises(ValueError) as err:
        TrainerConfig(**overrides).validate()
    assert message in str(err.value)


def test_a_gpu_device_without_a_gpu_is_refused_naming_the_field():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(
        ValueError, match=r"trainer\.device='cuda' but torch sees no CUDA GPU.*trainer\.device=cpu"
    ):
        resolve_device("cuda")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (lambda: TopKConfig(d_in=8, d_sae=16, k=2, aux_k_coef=NAN), "sae.aux_k_coef=nan must be >= 0"),
        (lambda: TopKConfig(d_in=8, d_sae=16, k=2.5), "sae.k=2.5 must be >= 1 (an integer)"),
        (lambda: BatchTopKConfig(d_in=8, d_sae=16, k=2, aux_k_coef=INF), "sae.aux_k_coef=inf must be >= 0"),
        (lambda: BatchTopKConfig(d_in=8, d_sae=16, k=2, threshold_decay=NAN), "sae.threshold_decay=nan"),
        (lambda: MPConfig(d_in=8, d_sae=16, k=2, aux_k_coef=NAN), "sae.aux_k_coef=nan must be >= 0"),
        (lambda: ReLUConfig(d_in=8, d_sae=16, l1_coefficient=NAN), "sae.l1_coefficient=nan must be > 0"),
        (lambda: ReLUConfig(d_in=8, d_sae=16, init_decoder_norm=INF), "sae.init_decoder_norm=inf"),
        (lambda: GBAConfig(d_in=8, d_sae=16, bias_lr=NAN), "sae.bias_lr=nan"),
        (lambda: GBAConfig(d_in=8, d_sae=16, target_freq_max=NAN), "sae.target_freq_max=nan"),
        (
            lambda: TopKConfig(d_in=8, d_sae=16, k=2, expansion_factor=0),
            "sae.expansion_factor=0 must be >= 1",
        ),
        (  # d_sae unset: the expansion factor is what is wrong, not the d_sae derived from it
            lambda: TopKConfig(d_in=8, k=2, expansion_factor=0).resolved(8),
            "sae.expansion_factor=0 must be >= 1",
        ),
        (
            lambda: JumpReLUConfig(d_in=8, d_sae=16, ste_to_input="false"),
            "sae.ste_to_input='false' must be True",
        ),
    ],
)
def test_sae_settings_are_refused_naming_the_field(config, message):
    with pytest.raises(ValueError) as err:
        config().validate()
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"noise_std": NAN}, "source.noise_std=nan must be >= 0"),
        ({"mean_active": NAN}, "source.mean_active=nan must be >= 0"),
        ({"max_magnitude": INF}, "source.max_magnitude=inf must be >= 0"),
        ({"frequency_decay": NAN}, "source.frequency_decay=nan"),
        ({"seed": 1.5}, "source.seed=1.5 must be an integer"),
        ({"mean_active": 600.0}, "source.mean_active=600.0 must be in (0, 512]"),
    ],
)
def test_synthetic_settings_are_refused_naming_the_field(overrides, message):
    with pytest.raises(ValueError) as err:
        SyntheticConfig(**overrides).validate()
    assert message in str(err.value)


# ----------------------------------------------------------------- inputs of any leading shape and dtype
def trained_like(config) -> saelab.SAE:
    """An SAE with random weights and, for BatchTopK, an inference threshold (otherwise set by training)."""
    sae = saelab.build_sae(config, generator(0, "sae.init")).eval()
    if hasattr(sae, "threshold") and isinstance(config, BatchTopKConfig):
        sae.threshold.fill_(0.05)
    return sae


VARIANTS = {
    "topk": lambda dtype: TopKConfig(d_in=8, d_sae=32, k=3, dtype=dtype),
    "batchtopk": lambda dtype: BatchTopKConfig(d_in=8, d_sae=32, k=3, dtype=dtype),
    "mp": lambda dtype: MPConfig(d_in=8, d_sae=32, k=3, dtype=dtype),
    "gba": lambda dtype: GBAConfig(d_in=8, d_sae=32, dtype=dtype),
    "relu": lambda dtype: ReLUConfig(d_in=8, d_sae=32, dtype=dtype),
    "jumprelu": lambda dtype: JumpReLUConfig(d_in=8, d_sae=32, dtype=dtype),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_encode_and_forward_accept_leading_dimensions_like_flat_rows(variant):
    sae = trained_like(VARIANTS[variant]("float32"))
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    flat = x.reshape(10, 8)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), sae.encode(flat).reshape(2, 5, 32))
        torch.testing.assert_close(sae(x), sae(flat).reshape(2, 5, 8))
        if hasattr(sae, "encode_sparse"):
            values, indices = sae.encode_sparse(x)
            flat_values, flat_indices = sae.encode_sparse(flat)
            assert values.shape[:2] == (2, 5)
            torch.testing.assert_close(values.reshape(10, -1), flat_values)
            assert torch.equal(indices.reshape(10, -1), flat_indices)
            # decode_sparse takes the same layout back: the dense decoder of the dense codes
            torch.testing.assert_close(sae.decode_sparse(values, indices), sae.decode(sae.encode(x)))
    with pytest.raises(ValueError, match=r"shape \(2, 5, 7\) but this SAE takes \[\.\.\., d_in=8\]"):
        sae.encode(torch.randn(2, 5, 7))


@pytest.mark.parametrize("variant", ["topk", "mp"])
def test_decode_sparse_refuses_codes_that_do_not_fit_the_sae(variant):
    sae = trained_like(VARIANTS[variant]("float32"))
    values, indices = sae.encode_sparse(torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"same \[\.\.\., w\] shape, got \(4, 3\) and \(4, 2\)"):
        sae.decode_sparse(values, indices[:, :2])
    with pytest.raises(ValueError, match=r"indices span \[\d+, 32\] but this SAE has d_sae=32"):
        sae.decode_sparse(values, indices.clone().index_fill_(1, torch.tensor([0]), 32))
    with pytest.raises(ValueError, match=r"span \[-1, "):
        sae.decode_sparse(values, indices - indices.min() - 1)
    with pytest.raises(TypeError, match="code indices have dtype torch.float32"):
        sae.decode_sparse(values, indices.float())
    with pytest.raises(TypeError, match="code values have dtype torch.int64"):
        sae.decode_sparse(indices, indices)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_inputs_are_cast_to_the_sae_dtype(variant):
    sae = trained_like(VARIANTS[variant]("bfloat16"))
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(2))  # float32 into a bf16 SAE
    with torch.no_grad():
        z = sae.encode(x)
        assert z.dtype == torch.bfloat16
        torch.testing.assert_close(z, sae.encode(x.bfloat16()))
        torch.testing.assert_close(sae(x), sae(x.bfloat16()))
        torch.testing.assert_close(sae.decode(z.float()), sae.decode(z))


# ------------------------------------------------------------------------------------- float16 weights
def test_fvu_of_float16_batches_is_summed_without_overflow():
    """A float16 batch whose sum of squares passes 65504 (float16's largest value): the FVU still equals the
    float64 formula (before, the denominator overflowed to inf and FVU read 0)."""
    from saelab.sae.losses import fraction_of_variance_unexplained

    gen = torch.Generator().manual_seed(3)
    x = 3 * torch.randn(1024, 64, generator=gen)
    x_hat = x + torch.randn(1024, 64, generator=gen)
    x16, x_hat16 = x.half(), x_hat.half()
    expected = (x16.double() - x_hat16.double()).pow(2).sum() / (x16.double() - x16.double().mean(0)).pow(
        2
    ).sum()
    assert (x16.double() - x16.double().mean(0)).pow(2).sum() > 65504  # the case that overflowed
    fvu = fraction_of_variance_unexplained(x16, x_hat16)
    assert fvu.dtype == torch.float32
    torch.testing.assert_close(fvu.double(), expected, rtol=1e-5, atol=0)
    assert (
        fraction_of_variance_unexplained(x16.double(), x_hat16.double()).dtype == torch.float64
    )  # not narrowed


def test_trainer_refuses_float16_weights_naming_the_field_and_the_fix(tmp_path):
    from saelab.train.trainer import Trainer

    sae = saelab.build_sae(TopKConfig(d_in=8, d_sae=32, k=3, dtype="float16"))
    with pytest.raises(
        ValueError, match=r"sae\.dtype=float16 cannot be trained.*sae\.dtype=float32.*dtype='float16'"
    ):
        Trainer(sae, TrainerConfig(total_tokens=4096, batch_size=256), output_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    bf16 = saelab.build_sae(TopKConfig(d_in=8, d_sae=32, k=3, dtype="bfloat16"))
    Trainer(bf16, TrainerConfig(total_tokens=4096, batch_size=256))  # bfloat16 has float32's range: allowed


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_decode_refuses_codes_of_the_wrong_width_or_dtype(variant):
    sae = trained_like(VARIANTS[variant]("float32"))
    with pytest.raises(
        ValueError, match=r"codes have shape \(5, 31\) but this SAE decodes \[\.\.\., d_sae=32\]"
    ):
        sae.decode(torch.rand(5, 31))
    with pytest.raises(TypeError, match="codes have dtype torch.int64"):
        sae.decode(torch.ones(5, 32, dtype=torch.int64))


@pytest.mark.parametrize("variant", ["topk", "batchtopk", "mp"])
def test_encode_sparse_checks_k_and_takes_an_empty_batch(variant):
    sae = trained_like(VARIANTS[variant]("float32"))
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(5))
    bound = r"\[1, 32\]" if variant != "mp" else ">= 1"  # pursuit steps may revisit atoms: no upper bound
    for k in (0, -1, 2.5) + ((33,) if variant != "mp" else ()):
        with pytest.raises(ValueError, match=rf"k={k!r} must be (in )?{bound} \(an integer\)"):
            sae.encode_sparse(x, k=k)
    values, indices = sae.encode_sparse(x[:0])
    assert values.shape[0] == indices.shape[0] == 0
    assert sae.decode_sparse(values, indices).shape == (0, 8)
