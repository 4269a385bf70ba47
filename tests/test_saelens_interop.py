"""SAELens on-disk format, both directions.

Hand-written SAELens directories are checked against float64 formulas of SAELens's inference rules (always
run). Against the real `sae-lens` package (in the dev extra): SAEs saved by it must give its own encode/decode
outputs in saelab, and saelab exports must load in it with the same outputs (skipped only where sae-lens is
not installed; an installed sae-lens that fails to import is an error).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from saelab import load_sae
from saelab.io import export_saelens
from saelab.sae.batchtopk import BatchTopKConfig, BatchTopKSAE
from saelab.sae.jumprelu import JumpReLUConfig, JumpReLUSAE
from saelab.sae.mp import MatchingPursuitSAE, MPConfig
from saelab.sae.relu import ReLUConfig, ReLUSAE
from saelab.sae.topk import TopKConfig, TopKSAE

if importlib.util.find_spec("sae_lens") is None:
    sae_lens = None
else:  # importing sae_lens takes a few seconds; done once for the module
    import sae_lens

needs_saelens = pytest.mark.skipif(
    sae_lens is None, reason="sae-lens is not installed (pip install -e '.[dev]')"
)
D_IN, D_SAE, K = 12, 40, 5


def write_saelens_dir(path: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.float().contiguous() for k, v in tensors.items()}, str(path / "sae_weights.safetensors"))
    return path


def random_params(gen: torch.Generator, threshold: bool = False) -> dict[str, torch.Tensor]:
    """Float32-representable random weights (so float64 references see exactly what the file holds)."""
    p = {
        "W_enc": torch.randn(D_IN, D_SAE, generator=gen) * 0.4,
        "b_enc": torch.randn(D_SAE, generator=gen) * 0.2,
        "W_dec": torch.randn(D_SAE, D_IN, generator=gen) * 0.4,
        "b_dec": torch.randn(D_IN, generator=gen) * 0.3,
    }
    if threshold:
        p["threshold"] = torch.rand(D_SAE, generator=gen) * 0.3
    return {k: v.float() for k, v in p.items()}


def f64(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in p.items()}


def topk_dense(h: torch.Tensor, k: int) -> torch.Tensor:
    """Slow reference: keep the k largest entries per row (ReLU on them), by sorting each row in a loop."""
    out = torch.zeros_like(h)
    for row in range(h.shape[0]):
        keep = h[row].argsort(descending=True)[:k]
        out[row, keep] = h[row, keep].clamp_min(0)
    return out


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


# ------------------------------------------------------ hand-written SAELens directories (no sae-lens)
def test_standard_without_b_dec_on_input_matches_formula(tmp_path, gen):
    p = random_params(gen)
    write_saelens_dir(
        tmp_path / "s",
        {
            "architecture": "standard",
            "d_in": D_IN,
            "d_sae": D_SAE,
            "dtype": "float32",
            "apply_b_dec_to_input": False,
            "normalize_activations": "none",
            "metadata": {
                "sae_lens_version": "6.5.0",
                "model_name": "gpt2",
                "hook_name": "blocks.4.hook_resid_pre",
            },
        },
        p,
    )
    sae = load_sae(tmp_path / "s")
    q, x = f64(p), torch.randn(32, D_IN, generator=gen, dtype=torch.float64)
    z_ref = (x @ q["W_enc"] + q["b_enc"]).relu()  # SAELens: b_dec is not subtracted from the input
    assert type(sae) is ReLUSAE and sae.cfg.architecture == "relu"
    torch.testing.assert_close(sae.encode(x.float()).double(), z_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae(x.float()).double(), z_ref @ q["W_dec"] + q["b_dec"], atol=1e-5, rtol=1e-5)
    meta = sae.cfg.metadata
    assert (meta["model_name"], meta["hook_name"], meta["hook_layer"]) == (
        "gpt2",
        "blocks.4.hook_resid_pre",
        4,
    )


def test_topk_rescaled_by_decoder_norm_matches_formula(tmp_path, gen):
    p = random_params(gen)
    write_saelens_dir(
        tmp_path / "t",
        {
            "architecture": "topk",
            "d_in": D_IN,
            "d_sae": D_SAE,
            "k": K,
            "dtype": "float32",
            "rescale_acts_by_decoder_norm": True,
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "metadata": {"sae_lens_version": "6.5.0"},
        },
        p,
    )
    sae = load_sae(tmp_path / "t")
    q, x = f64(p), torch.randn(32, D_IN, generator=gen, dtype=torch.float64)
    norms = q["W_dec"].norm(dim=1)
    z_ref = topk_dense(((x - q["b_dec"]) @ q["W_enc"] + q["b_enc"]) * norms, K)
    x_hat_ref = (z_ref / norms) @ q["W_dec"] + q["b_dec"]
    torch.testing.assert_close(sae.encode(x.float()).double(), z_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae(x.float()).double(), x_hat_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE), atol=1e-6, rtol=0)


def test_jumprelu_log_threshold_matches_formula(tmp_path, gen):
    p = random_params(gen, threshold=True)
    p["log_threshold"] = p.pop("threshold").clamp_min(1e-3).log()
    write_saelens_dir(
        tmp_path / "j",
        {
            "architecture": "jumprelu",
            "d_in": D_IN,
            "d_sae": D_SAE,
            "dtype": "float32",
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
        },
        p,
    )
    sae = load_sae(tmp_path / "j", dtype=torch.float64)
    q, x = f64(p), torch.randn(64, D_IN, generator=gen, dtype=torch.float64)
    h = (x - q["b_dec"]) @ q["W_enc"] + q["b_enc"]
    z_ref = torch.where(h > q["log_threshold"].exp(), h.clamp_min(0), torch.zeros_like(h))
    assert sae.W_enc.dtype == torch.float64 and sae.cfg.dtype == "float64"
    assert 0 < (z_ref > 0).float().mean() < (h > 0).float().mean()  # the threshold matters in this batch
    torch.testing.assert_close(sae.encode(x), z_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sae.decode(z_ref), z_ref @ q["W_dec"] + q["b_dec"], atol=1e-6, rtol=1e-6)


def test_pre_v6_flat_config_with_finetuning_scaling_factor(tmp_path, gen):
    p = random_params(gen)
    p["scaling_factor"] = torch.rand(D_SAE, generator=gen) + 0.5
    write_saelens_dir(
        tmp_path / "old",
        {
            "d_in": D_IN,
            "d_sae": D_SAE,
            "dtype": "torch.float32",
            "activation_fn_str": "topk",
            "activation_fn_kwargs": {"k": K},
            "hook_point": "blocks.7.hook_resid_pre",
            "model_name": "gpt2-small",
            "finetuning_scaling_factor": True,
            "normalize_activations": False,
            "sae_lens_version": "3.11.0",
        },
        p,
    )
    sae = load_sae(tmp_path / "old")
    q, x = f64(p), torch.randn(32, D_IN, generator=gen, dtype=torch.float64)
    z_ref = topk_dense((x - q["b_dec"]) @ q["W_enc"] + q["b_enc"], K)
    x_hat_ref = (z_ref * q["scaling_factor"]) @ q["W_dec"] + q["b_dec"]  # old decode scaled the codes
    assert type(sae) is TopKSAE and sae.cfg.k == K
    torch.testing.assert_close(sae.encode(x.float()).double(), z_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae(x.float()).double(), x_hat_ref, atol=1e-5, rtol=1e-5)
    assert sae.cfg.metadata["hook_name"] == "blocks.7.hook_resid_pre" and sae.cfg.metadata["hook_layer"] == 7


def test_expected_average_scale_is_required_then_folded(tmp_path, gen):
    p, s = random_params(gen), 3.5
    cfg = {
        "architecture": "standard",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "normalize_activations": "expected_average_only_in",
        "metadata": {"sae_lens_version": "6.5.0"},
    }
    folder = write_saelens_dir(tmp_path / "n", cfg, p)
    with pytest.raises(ValueError, match="norm_scaling_factor"):
        load_sae(folder)
    q, x = f64(p), torch.randn(32, D_IN, generator=gen, dtype=torch.float64)
    z_ref = ((x * s - q["b_dec"]) @ q["W_enc"] + q["b_enc"]).relu()  # SAELens saw s * x in training
    x_hat_ref = (z_ref @ q["W_dec"] + q["b_dec"]) / s
    given = load_sae(folder, norm_scaling_factor=s)
    (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": s}))
    stored = load_sae(folder)  # SAELens training checkpoints keep the factor in activation_scaler.json
    for sae in (given, stored):
        torch.testing.assert_close(sae.encode(x.float()).double(), z_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae(x.float()).double(), x_hat_ref, atol=1e-5, rtol=1e-5)
        assert sae.cfg.metadata["input_scale_folded"] == s


@pytest.mark.parametrize("bad", [math.nan, math.inf, 0.0, -2.0, "abc", True])
def test_a_bad_scaling_factor_is_refused_naming_where_it_came_from(tmp_path, gen, bad):
    """Folding NaN, Inf, 0 or a negative factor would give an SAE computing garbage; refuse it, by argument or
    in activation_scaler.json, and refuse a scaler file that is not a JSON object holding the factor."""
    cfg = {
        "architecture": "standard",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "normalize_activations": "expected_average_only_in",
    }
    folder = write_saelens_dir(tmp_path / "n", cfg, random_params(gen))
    if not isinstance(bad, str):
        with pytest.raises(ValueError, match=r"norm_scaling_factor=.* must be a finite number > 0"):
            load_sae(folder, norm_scaling_factor=bad)
    scaler = folder / "activation_scaler.json"
    scaler.write_text(json.dumps({"scaling_factor": bad}))
    with pytest.raises(
        ValueError, match=r"scaling_factor in .*activation_scaler\.json=.* must be a finite number > 0"
    ):
        load_sae(folder)
    for text, message in (
        ('{"scal', "is not valid JSON"),
        ("[1]", "holds a JSON list"),
        ("{}", "has no 'scaling_factor'"),
    ):
        scaler.write_text(text)
        with pytest.raises(ValueError, match=rf"activation_scaler\.json {message}"):
            load_sae(folder)


@pytest.mark.parametrize("norm", ["layer_norm", "constant_norm_rescale", "covariance_whitening"])
def test_runtime_normalisations_are_refused(tmp_path, gen, norm):
    cfg = {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "normalize_activations": norm}
    with pytest.raises(ValueError, match=f"normalize_activations='{norm}'.*cannot fold"):
        load_sae(write_saelens_dir(tmp_path / norm, cfg, random_params(gen)))


def test_unknown_saelens_architecture_names_it_and_the_file(tmp_path, gen):
    folder = write_saelens_dir(
        tmp_path / "g", {"architecture": "temporal", "d_in": D_IN, "d_sae": D_SAE}, random_params(gen)
    )
    with pytest.raises(ValueError, match=r"cfg\.json: architecture='temporal' is unknown"):
        load_sae(folder)


@pytest.mark.parametrize("flag", ["rescale_acts_by_decoder_norm", "apply_b_dec_to_input"])
def test_saelens_flags_must_be_booleans(tmp_path, gen, flag):
    cfg = {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, flag: "false"}
    with pytest.raises(ValueError, match=rf"cfg\.json: {flag}='false' must be true or false"):
        load_sae(write_saelens_dir(tmp_path / "f", cfg, random_params(gen)))


def test_a_metadata_field_that_is_not_an_object_is_named(tmp_path, gen):
    cfg = {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "metadata": "str"}
    with pytest.raises(ValueError, match=r"cfg\.json: metadata='str' must be a JSON object"):
        load_sae(write_saelens_dir(tmp_path / "m", cfg, random_params(gen)))


def test_norm_scaling_factor_refused_for_an_unscaled_sae(tmp_path, gen):
    folder = write_saelens_dir(
        tmp_path / "u", {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE}, random_params(gen)
    )
    with pytest.raises(ValueError, match="must not be given"):
        load_sae(folder, norm_scaling_factor=2.0)


def test_export_writes_saelens_layout(tmp_path, gen):
    sae = TopKSAE(TopKConfig(d_in=D_IN, d_sae=D_SAE, k=K, metadata={"hook_name": "blocks.1.hook_resid_post"}))
    export_saelens(sae, tmp_path / "e")
    cfg = json.loads((tmp_path / "e" / "cfg.json").read_text())
    tensors = load_file(str(tmp_path / "e" / "sae_weights.safetensors"))
    assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"], cfg["k"]) == ("topk", D_IN, D_SAE, K)
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    assert cfg["rescale_acts_by_decoder_norm"] is False
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert int(cfg["metadata"]["sae_lens_version"].split(".")[0]) >= 6  # SAELens then keeps `metadata`
    assert set(tensors) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    assert tensors["W_enc"].shape == (D_IN, D_SAE) and tensors["W_dec"].shape == (D_SAE, D_IN)
    assert torch.equal(tensors["W_dec"], sae.W_dec.detach())


def test_export_refuses_a_variant_saelens_lacks(tmp_path):
    sae = MatchingPursuitSAE(MPConfig(d_in=D_IN, d_sae=D_SAE))
    with pytest.raises(ValueError, match="no equivalent of saelab's 'mp'"):
        export_saelens(sae, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def batchtopk_sae(gen: torch.Generator, threshold: float) -> BatchTopKSAE:
    sae = BatchTopKSAE(BatchTopKConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    sae.load_state_dict({**random_params(gen), "threshold": torch.tensor(threshold)})
    return sae.eval()


def test_batchtopk_exports_as_jumprelu_with_its_threshold(tmp_path, gen):
    sae = batchtopk_sae(gen, threshold=0.15)
    export_saelens(sae, tmp_path / "b")
    cfg = json.loads((tmp_path / "b" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["metadata"]["saelab_architecture"] == "batchtopk"
    back = load_sae(tmp_path / "b")
    q, x = (
        f64({k: v for k, v in sae.state_dict().items()}),
        torch.randn(64, D_IN, generator=gen, dtype=torch.float64),
    )
    pre = (x - q["b_dec"]) @ q["W_enc"] + q["b_enc"]
    z_ref = pre * (pre > 0.15)  # BatchTopK's inference rule
    assert type(back) is JumpReLUSAE and torch.equal(back.threshold, torch.full((D_SAE,), 0.15))
    torch.testing.assert_close(back.encode(x.float()).double(), z_ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no usable inference threshold"):
        export_saelens(batchtopk_sae(gen, threshold=float("nan")), tmp_path / "untrained")


# ------------------------------------------------------------------------ against the real sae-lens
def randomised(sae, gen: torch.Generator):
    """Fill every parameter with random values (decoder rows of varied norm, positive thresholds)."""
    with torch.no_grad():
        for name, p in sae.named_parameters():
            values = torch.randn(p.shape, generator=gen) * 0.3
            p.copy_(values.abs() if name == "threshold" else values)
    return sae


SAELENS_CASES = [
    ("standard", {}),
    ("standard", {"apply_b_dec_to_input": False}),
    ("topk", {"k": K}),
    ("topk", {"k": K, "rescale_acts_by_decoder_norm": True}),
    ("jumprelu", {}),
    ("jumprelu", {"apply_b_dec_to_input": False}),
]


def saelens_sae(arch: str, gen: torch.Generator, **cfg):
    cls = {"standard": sae_lens.StandardSAE, "topk": sae_lens.TopKSAE, "jumprelu": sae_lens.JumpReLUSAE}[arch]
    cfg_cls = {
        "standard": sae_lens.StandardSAEConfig,
        "topk": sae_lens.TopKSAEConfig,
        "jumprelu": sae_lens.JumpReLUSAEConfig,
    }[arch]
    metadata = sae_lens.saes.sae.SAEMetadata(model_name="gpt2", hook_name="blocks.2.hook_resid_post")
    return randomised(cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, metadata=metadata, **cfg)), gen).eval()


def assert_same_outputs(ours, theirs, x: torch.Tensor, in_scale: float = 1.0) -> None:
    """ours on raw x == theirs on in_scale * x, with theirs' reconstruction mapped back by 1 / in_scale."""
    with torch.no_grad():
        z = theirs.encode(x * in_scale)
        assert (z != 0).any()
        torch.testing.assert_close(ours.encode(x), z, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.decode(z), theirs.decode(z) / in_scale, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(x), theirs(x * in_scale) / in_scale, atol=1e-5, rtol=1e-5)


@needs_saelens
@pytest.mark.parametrize(("arch", "cfg"), SAELENS_CASES)
def test_saelens_saved_sae_loads_with_identical_outputs(tmp_path, gen, arch, cfg):
    theirs = saelens_sae(arch, gen, **cfg)
    theirs.save_model(tmp_path / "sl")
    ours = load_sae(tmp_path / "sl")
    assert ours.cfg.architecture == {"standard": "relu"}.get(arch, arch)
    assert (
        ours.cfg.metadata["hook_name"] == "blocks.2.hook_resid_post" and ours.cfg.metadata["hook_layer"] == 2
    )
    assert_same_outputs(ours, theirs, torch.randn(64, D_IN, generator=gen))


@needs_saelens
def test_saelens_topk_training_checkpoint_loads(tmp_path, gen):
    """A TopK training SAE (decoder norms folded only at inference export) saved with save_model."""
    theirs = randomised(
        sae_lens.TopKTrainingSAE(sae_lens.TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K)), gen
    )
    assert theirs.cfg.rescale_acts_by_decoder_norm
    theirs.save_model(tmp_path / "train")
    assert_same_outputs(load_sae(tmp_path / "train"), theirs.eval(), torch.randn(64, D_IN, generator=gen))


@needs_saelens
def test_saelens_unfolded_norm_scaling_factor(tmp_path, gen):
    theirs = saelens_sae("standard", gen, normalize_activations="expected_average_only_in")
    theirs.save_model(tmp_path / "n")
    with pytest.raises(ValueError, match="norm_scaling_factor"):
        load_sae(tmp_path / "n")
    assert_same_outputs(load_sae(tmp_path / "n", norm_scaling_factor=2.5), theirs, torch.randn(64, D_IN), 2.5)


def saelab_sae(arch: str, gen: torch.Generator):
    meta = {"model_name": "gpt2", "hook_name": "blocks.5.hook_resid_post", "training_tokens": 1000}
    if arch == "batchtopk":
        sae = batchtopk_sae(gen, threshold=0.1)
        sae.cfg.metadata = meta
        return sae
    if arch == "relu":
        return randomised(ReLUSAE(ReLUConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta)), gen).eval()
    if arch == "topk":
        return randomised(TopKSAE(TopKConfig(d_in=D_IN, d_sae=D_SAE, k=K, metadata=meta)), gen).eval()
    return randomised(JumpReLUSAE(JumpReLUConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta)), gen).eval()


@needs_saelens
@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu", "batchtopk"])
def test_saelab_export_loads_in_saelens_with_identical_outputs(tmp_path, gen, arch):
    ours = saelab_sae(arch, gen)
    export_saelens(ours, tmp_path / "ex")
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "ex")
    expected = {
        "relu": "StandardSAE",
        "topk": "TopKSAE",
        "jumprelu": "JumpReLUSAE",
        "batchtopk": "JumpReLUSAE",
    }
    assert type(theirs).__name__ == expected[arch]
    assert theirs.cfg.metadata.hook_name == "blocks.5.hook_resid_post"
    assert theirs.cfg.metadata.training_tokens == 1000
    assert_same_outputs(ours, theirs, torch.randn(64, D_IN, generator=gen))
    theirs.save_model(tmp_path / "back")  # and back again: weights survive exactly
    again = load_sae(tmp_path / "back")
    for name, p in ours.state_dict().items():  # BatchTopK's scalar threshold comes back per latent
        assert torch.equal(again.state_dict()[name], p.expand(D_SAE) if p.ndim == 0 else p), name


@needs_saelens
@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_saelab_native_save_loads_in_saelens(tmp_path, gen, arch):
    """saelab's own cfg.json is SAELens-6 layout: variants SAELens knows by the same name load directly."""
    ours = saelab_sae(arch, gen)
    ours.save(tmp_path / "native")
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "native")
    assert theirs.cfg.metadata.hook_name == "blocks.5.hook_resid_post"
    assert_same_outputs(ours, theirs, torch.randn(64, D_IN, generator=gen))


@needs_saelens
@pytest.mark.parametrize("arch", ["relu", "batchtopk"])
def test_saelab_native_save_of_other_variants_loads_in_both(tmp_path, gen, arch):
    """relu is written as SAELens's `standard`, batchtopk as `jumprelu` with its threshold per latent (as
    SAELens saves an inference BatchTopK); saelab still loads them back as the variant they are."""
    ours = saelab_sae(arch, gen)
    ours.save(tmp_path / "native")
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "native")
    assert type(theirs).__name__ == {"relu": "StandardSAE", "batchtopk": "JumpReLUSAE"}[arch]
    x = torch.randn(64, D_IN, generator=gen)
    assert_same_outputs(ours, theirs, x)
    back = load_sae(tmp_path / "native")
    assert type(back) is type(ours) and back.cfg.architecture == arch
    for name, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name
    torch.testing.assert_close(back(x), ours(x), rtol=0, atol=0)


@needs_saelens
@pytest.mark.parametrize("arch", ["mp", "gba"])
def test_saelab_only_variants_fail_clearly_in_saelens(tmp_path, gen, arch):
    from saelab.sae.gba import GBAConfig, GroupBiasAdaptationSAE

    meta = {"hook_name": "blocks.5.hook_resid_post"}
    ours = (
        MatchingPursuitSAE(MPConfig(d_in=D_IN, d_sae=D_SAE, k=K, metadata=meta))
        if arch == "mp"
        else GroupBiasAdaptationSAE(GBAConfig(d_in=D_IN, d_sae=D_SAE, n_groups=4, metadata=meta))
    )
    randomised(ours, gen).eval().save(tmp_path / "native")
    with pytest.raises(KeyError, match=f"{arch} .*SAELens cannot load: use saelab.load_sae"):
        sae_lens.SAE.load_from_disk(tmp_path / "native")
    back = load_sae(tmp_path / "native")
    assert type(back) is type(ours)
    x = torch.randn(16, D_IN, generator=gen)
    torch.testing.assert_close(back(x), ours(x), rtol=0, atol=0)


@needs_saelens
def test_saelens_batchtopk_training_save_names_the_fix(tmp_path, gen):
    theirs = sae_lens.BatchTopKTrainingSAE(sae_lens.BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    theirs.save_model(tmp_path / "train")
    with pytest.raises(ValueError, match=r"BatchTopK \*training\* save.*save_inference_model"):
        load_sae(tmp_path / "train")
    randomised(theirs, gen).save_inference_model(tmp_path / "inference")  # the fix the message names
    assert type(load_sae(tmp_path / "inference")).__name__ == "JumpReLUSAE"


def train_run(tmp_path: Path, sae) -> Path:
    """A short run on planted features with checkpoints at steps 3 and 6 (input scale far from 1)."""
    from saelab.sources.synthetic import SyntheticConfig, SyntheticSource
    from saelab.train.config import TrainerConfig
    from saelab.train.trainer import Trainer

    source = SyntheticSource(SyntheticConfig(d_in=D_IN, n_features=64, seed=4))
    cfg = TrainerConfig(total_tokens=8 * 64, batch_size=64, checkpoint_every=3, device="cpu", log_every=4)
    Trainer(sae, cfg, output_dir=tmp_path).fit(source)
    return tmp_path / "checkpoints" / "step_000000006"


@needs_saelens
@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk"])
def test_checkpoint_loads_in_saelens_with_raw_activation_outputs(tmp_path, gen, arch):
    """A checkpoint in SAELens takes raw activations: the same outputs as saelab.load_sae, and both equal the
    float64 result of the training-space weights on s * x, mapped back by 1 / s."""
    cfg_cls = {"relu": ReLUConfig, "topk": TopKConfig, "batchtopk": BatchTopKConfig}[arch]
    kwargs = {} if arch == "relu" else {"k": K}
    sae_cls = {"relu": ReLUSAE, "topk": TopKSAE, "batchtopk": BatchTopKSAE}[arch]
    step_dir = train_run(tmp_path, sae_cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, **kwargs)))
    state = torch.load(step_dir / "trainer_state.pt", weights_only=True)
    s = state["input_scale"]
    assert abs(s - 1) > 0.5  # the planted data's norms are far from sqrt(d_in): a missing fold shows
    w = {k: v.double() for k, v in load_file(str(step_dir / "training_weights.safetensors")).items()}
    x = torch.randn(64, D_IN, generator=gen, dtype=torch.float64) * 2
    pre = (s * x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    if arch == "relu":
        z_ref = pre.relu()
    elif arch == "topk":
        z_ref = topk_dense(pre, K)
    else:
        z_ref = pre * (pre > w["threshold"])
    x_hat_ref = (z_ref @ w["W_dec"] + w["b_dec"]) / s
    theirs = sae_lens.SAE.load_from_disk(step_dir)
    ours = load_sae(step_dir)
    assert theirs.cfg.metadata.training_tokens == 6 * 64
    with torch.no_grad():
        for model in (theirs, ours):
            torch.testing.assert_close(model.encode(x.float()).double(), z_ref, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(model(x.float()).double(), x_hat_ref, atol=1e-4, rtol=1e-4)
    assert type(ours) is sae_cls


@needs_saelens
def test_an_untrained_batchtopk_save_fails_clearly_in_saelens_instead_of_giving_zero_codes(tmp_path):
    """Before training the threshold is NaN: SAELens would load it and every code would be 0."""
    untrained = BatchTopKSAE(
        BatchTopKConfig(d_in=D_IN, d_sae=D_SAE, k=K, metadata={"hook_name": "blocks.5.h"})
    )
    untrained.save(tmp_path / "untrained")
    with pytest.raises(KeyError, match=r"untrained: no inference threshold yet, so SAELens cannot load it"):
        sae_lens.SAE.load_from_disk(tmp_path / "untrained")
    back = load_sae(
        tmp_path / "untrained"
    )  # saelab loads it (to train further), and refuses to encode with it
    assert type(back) is BatchTopKSAE and back.threshold.isnan()
    with pytest.raises(RuntimeError, match="no inference threshold yet"):
        back.encode(torch.zeros(2, D_IN))
