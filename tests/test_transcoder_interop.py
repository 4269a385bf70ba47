"""Transcoders and gated SAEs against the real SAELens package, both ways: saelab's files load in SAELens as its
`transcoder` / `skip_transcoder` / `jumprelu_transcoder` / `jumprelu_skip_transcoder` / `gated` with equal
outputs, and SAELens's saves load in saelab (sparsify transcoders: tests/test_interop_sparsify.py;
dictionary_learning's GatedAutoEncoder: tests/test_interop_dictionary_learning.py)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
import torch

from saelab import load_sae
from saelab.io import export_saelens
from saelab.sae.gated import GatedConfig, GatedSAE
from saelab.sae.transcoder import transcoder_class

if importlib.util.find_spec("sae_lens") is None:
    sae_lens = None
else:
    import sae_lens
    from sae_lens.saes.gated_sae import GatedSAEConfig
    from sae_lens.saes.transcoder import (
        JumpReLUSkipTranscoder,
        JumpReLUSkipTranscoderConfig,
        JumpReLUTranscoder,
        JumpReLUTranscoderConfig,
        SkipTranscoder,
        SkipTranscoderConfig,
        Transcoder,
        TranscoderConfig,
    )
needs_saelens = pytest.mark.skipif(
    sae_lens is None, reason="sae-lens is not installed (pip install -e '.[dev]')"
)

D_IN, D_OUT, N, K = 10, 7, 32, 4
META = {
    "model_name": "tiny",
    "hook_name": "blocks.1.ln2.hook_normalized",
    "hook_name_out": "blocks.1.hook_mlp_out",
}
#: saelab transcoder (variant, skip) -> the SAELens architecture its files load as.
EXPORTS = {
    ("relu", False): "transcoder",
    ("relu", True): "skip_transcoder",
    ("jumprelu", False): "jumprelu_transcoder",
    ("jumprelu", True): "jumprelu_skip_transcoder",
    ("batchtopk", True): "jumprelu_skip_transcoder",
    ("matryoshka", False): "jumprelu_transcoder",
}


def random_transcoder(variant: str, skip: bool, gen: torch.Generator):
    cls = transcoder_class(variant, skip)
    names = {f.name for f in dataclasses.fields(cls.config_class)}
    sae = cls(
        cls.config_class(
            d_in=D_IN, d_out=D_OUT, d_sae=N, metadata=dict(META), **({"k": K} if "k" in names else {})
        )
    )
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(
                torch.randn(p.shape, generator=gen).abs() * 0.1
                if name == "threshold"
                else torch.randn(p.shape, generator=gen) * 0.3
            )
        sae.b_in.copy_(torch.randn(D_IN, generator=gen))  # folded into b_enc in the files
        if hasattr(sae, "threshold") and not isinstance(sae.threshold, torch.nn.Parameter):
            sae.threshold.fill_(0.1)  # BatchTopK's inference threshold
    return sae.eval()


@needs_saelens
@pytest.mark.parametrize(("variant", "skip"), list(EXPORTS))
def test_saelab_transcoder_loads_in_saelens_with_equal_outputs(tmp_path, variant, skip):
    gen = torch.Generator().manual_seed(1)
    ours = random_transcoder(variant, skip, gen)
    ours.save(tmp_path / "sae")
    export_saelens(ours, tmp_path / "exported")
    for folder in ("sae", "exported"):
        theirs = sae_lens.SAE.load_from_disk(str(tmp_path / folder))
        assert theirs.cfg.architecture() == EXPORTS[variant, skip] and theirs.cfg.d_out == D_OUT
        assert theirs.cfg.metadata.hook_name_out == META["hook_name_out"]
        x = torch.randn(64, D_IN, generator=gen) * 2
        with torch.no_grad():
            z = ours.encode(x)
            assert 0 < int((z != 0).sum()) < z.numel()
            torch.testing.assert_close(theirs.encode(x), z, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-5)
    assert (
        json.loads((tmp_path / "sae" / "cfg.json").read_text())["saelab_architecture"]
        == ours.cfg.architecture
    )


SAELENS_TRANSCODERS = {
    "transcoder": ("relu", False),
    "skip_transcoder": ("relu", True),
    "jumprelu_transcoder": ("jumprelu", False),
    "jumprelu_skip_transcoder": ("jumprelu", True),
}


@needs_saelens
@pytest.mark.parametrize("arch", list(SAELENS_TRANSCODERS))
def test_saelens_transcoder_loads_in_saelab_with_equal_outputs(tmp_path, arch):
    gen = torch.Generator().manual_seed(2)
    cls, cfg_cls = {
        "transcoder": (Transcoder, TranscoderConfig),
        "skip_transcoder": (SkipTranscoder, SkipTranscoderConfig),
        "jumprelu_transcoder": (JumpReLUTranscoder, JumpReLUTranscoderConfig),
        "jumprelu_skip_transcoder": (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig),
    }[arch]
    metadata = sae_lens.saes.sae.SAEMetadata(**META)
    theirs = cls(cfg_cls(d_in=D_IN, d_sae=N, d_out=D_OUT, apply_b_dec_to_input=False, metadata=metadata))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            values = torch.randn(p.shape, generator=gen) * 0.3
            p.copy_(values.abs() * 0.3 if name == "threshold" else values)
    theirs.save_model(str(tmp_path / "sl"))
    ours = load_sae(tmp_path / "sl")
    assert type(ours) is transcoder_class(*SAELENS_TRANSCODERS[arch])
    assert (ours.d_in, ours.d_out, ours.cfg.metadata["hook_name_out"]) == (D_IN, D_OUT, META["hook_name_out"])
    x = torch.randn(64, D_IN, generator=gen) * 2
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), theirs.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_a_transcoder_file_that_centres_its_input_by_b_dec_is_refused(tmp_path):
    sae = random_transcoder("relu", False, torch.Generator().manual_seed(3))
    folder = sae.save(tmp_path / "t")
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "apply_b_dec_to_input": True}))
    with pytest.raises(ValueError, match=r"apply_b_dec_to_input=true, but a transcoder's b_dec"):
        load_sae(folder)


def random_gated(gen: torch.Generator) -> GatedSAE:
    sae = GatedSAE(GatedConfig(d_in=D_IN, d_sae=N, metadata={"hook_name": "blocks.1.hook_resid_post"}))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return sae.eval()


def gated_reference(p: dict[str, torch.Tensor], x: torch.Tensor, centred: bool = True):
    """The gated SAE's rule in float64: (codes, reconstruction)."""
    p = {k: v.double() for k, v in p.items()}
    u = x.double() - p["b_dec"] if centred else x.double()
    z = (u @ p["W_enc"] + p["b_gate"] > 0) * (u @ (p["W_enc"] * p["r_mag"].exp()) + p["b_mag"]).relu()
    return z, z @ p["W_dec"] + p["b_dec"]


def test_gated_sae_computes_its_rule():
    sae = random_gated(torch.Generator().manual_seed(4))
    x = torch.randn(64, D_IN) * 2
    z, out = gated_reference(dict(sae.named_parameters()), x)
    with torch.no_grad():
        assert 0 < int((sae.encode(x) != 0).sum()) < z.numel()
        torch.testing.assert_close(sae.encode(x).double(), z, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sae(x).double(), out, rtol=1e-6, atol=1e-6)


@needs_saelens
def test_gated_sae_loads_in_saelens_and_back(tmp_path):
    gen = torch.Generator().manual_seed(5)
    ours = random_gated(gen)
    ours.save(tmp_path / "ours")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "ours"))
    assert theirs.cfg.architecture() == "gated"
    x = torch.randn(64, D_IN, generator=gen) * 2
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), ours.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-5)
    for centred in (True, False):  # SAELens's own saves, with and without b_dec subtracted from the input
        cfg = GatedSAEConfig(d_in=D_IN, d_sae=N, apply_b_dec_to_input=centred)
        sl = type(theirs)(cfg)
        with torch.no_grad():
            for p in sl.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        sl.save_model(str(tmp_path / f"sl{centred}"))
        back = load_sae(tmp_path / f"sl{centred}")
        assert type(back) is GatedSAE
        z, out = gated_reference(dict(sl.named_parameters()), x, centred)
        with torch.no_grad():
            torch.testing.assert_close(back.encode(x).double(), z, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(back(x).double(), out, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(back(x), sl(x), rtol=1e-5, atol=1e-5)
