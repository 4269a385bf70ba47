"""EleutherAI sparsify's on-disk format, both directions.

Hand-written sparsify folders are checked against float64 formulas of sparsify's inference rule (always run).
When the real `eai-sparsify` package is importable (the `dev` extra installs it), coders saved by it must give
its own encode/decode outputs in saelab, and saelab exports must load in it with the same outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_loading import COMMIT, put_in_hf_cache

from saelab import load_sae
from saelab.io import export_sparsify
from saelab.sae.relu import ReLUConfig, ReLUSAE
from saelab.sae.topk import TopKConfig, TopKSAE
from saelab.sae.transcoder import transcoder_class

try:  # importing sparsify takes ~5 s (transformers, accelerate); done once for the module
    import sparsify
except ImportError:
    sparsify = None

needs_sparsify = pytest.mark.skipif(
    sparsify is None, reason="eai-sparsify is not installed (pip install eai-sparsify)"
)
D_IN, N, K = 12, 40, 5


def random_coder(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random float32 weights under sparsify's names."""
    return {
        "encoder.weight": torch.randn(N, D_IN, generator=gen) * 0.4,
        "encoder.bias": torch.randn(N, generator=gen) * 0.2,
        "W_dec": torch.randn(N, D_IN, generator=gen) * 0.4,
        "b_dec": torch.randn(D_IN, generator=gen) * 0.3,
    }


def write_coder(path: Path, tensors: dict[str, torch.Tensor], **cfg) -> Path:
    """A sparsify folder as SparseCoder.save_to_disk writes it: cfg.json (config fields + d_in), sae.safetensors."""
    path.mkdir(parents=True)
    fields = {
        "activation": "topk",
        "expansion_factor": 32,
        "normalize_decoder": True,
        "num_latents": N,
        "k": K,
    }
    fields.update(multi_topk=False, skip_connection=False, transcode=False)
    (path / "cfg.json").write_text(json.dumps({**fields, **cfg, "d_in": D_IN}))
    save_file(tensors, str(path / "sae.safetensors"))
    return path


def reference(t: dict[str, torch.Tensor], x: torch.Tensor, transcode: bool = False):
    """sparsify's rule in float64, top-k by sorting each row: (dense codes [B, N], output [B, D_IN]; with a
    skip connection the output adds x @ W_skip^T)."""
    t = {k: v.double() for k, v in t.items()}
    x = x.double()
    pre = ((x if transcode else x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"]).relu()
    z = torch.zeros_like(pre)
    for row in range(pre.shape[0]):
        keep = pre[row].argsort(descending=True)[:K]
        z[row, keep] = pre[row, keep]
    skip = x @ t["W_skip"].T if "W_skip" in t else 0.0
    return z, z @ t["W_dec"] + t["b_dec"] + skip


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


# -------------------------------------------------------------- hand-written folders (no package needed)
@pytest.mark.parametrize("transcode", [False, True])
@pytest.mark.parametrize("skip", [False, True])
def test_folder_matches_formula(tmp_path, gen, transcode, skip):
    """SAEs load as topk, transcoders and skip connections (with or without transcode) as topk transcoders."""
    t = random_coder(gen)
    if skip:
        t["W_skip"] = torch.randn(D_IN, D_IN, generator=gen) * 0.2
    folder = write_coder(tmp_path / "layers.6", t, transcode=transcode, multi_topk=True, skip_connection=skip)
    sae = load_sae(folder)
    want = transcoder_class("topk", skip) if transcode or skip else TopKSAE
    assert type(sae) is want and (sae.d_in, sae.d_sae, sae.cfg.k) == (D_IN, N, K)
    x = torch.randn(64, D_IN, generator=gen) * 2
    z_ref, out_ref = reference(t, x, transcode)
    torch.testing.assert_close(sae.encode(x).double(), z_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(x).double(), out_ref, rtol=1e-5, atol=1e-5)
    meta = sae.cfg.metadata
    assert (meta["hookpoint"], meta["hook_layer"], meta["sparsify"]["multi_topk"]) == ("layers.6", 6, True)
    back = load_sae(export_sparsify(sae, tmp_path / "again" / "layers.6"))  # written back as it came
    assert json.loads((tmp_path / "again" / "layers.6" / "cfg.json").read_text())["transcode"] is transcode
    torch.testing.assert_close(back(x).double(), out_ref, rtol=1e-5, atol=1e-5)


def test_unsupported_options_are_refused_naming_the_field(tmp_path, gen):
    t = random_coder(gen)
    with pytest.raises(ValueError, match=r"skip_connection=true has exactly \['W_dec', 'W_skip'"):
        load_sae(write_coder(tmp_path / "skip", t, skip_connection=True))  # no W_skip tensor
    with pytest.raises(ValueError, match=r"activation='groupmax' is not supported"):
        load_sae(write_coder(tmp_path / "groupmax", t, activation="groupmax"))
    with pytest.raises(ValueError, match=r"field\(s\) \['signed'\] = \[True\]"):
        load_sae(write_coder(tmp_path / "fork", t, signed=True))
    assert (
        load_sae(write_coder(tmp_path / "fork_off", t, signed=False)).cfg.k == K
    )  # a false flag is harmless
    with pytest.raises(ValueError, match=r"k=41 must be an integer in \[1, 40\]"):
        load_sae(write_coder(tmp_path / "k", t, k=N + 1))
    with pytest.raises(ValueError, match=r"num_latents=39 .* give 39 latents but the weights have 40"):
        load_sae(write_coder(tmp_path / "n", t, num_latents=N - 1))
    with pytest.raises(ValueError, match=r"holds tensors .*exactly \['W_dec', 'b_dec'"):
        load_sae(write_coder(tmp_path / "missing", {k: v for k, v in t.items() if k != "W_dec"}))
    with pytest.raises(ValueError, match=r"cfg\.json: transcode='false' must be true or false"):
        load_sae(write_coder(tmp_path / "flag", t, transcode="false"))  # a string would count as true
    with pytest.raises(ValueError, match=r"cfg\.json: num_latents='40' must be a non-negative integer"):
        load_sae(write_coder(tmp_path / "str_n", t, num_latents=str(N)))
    assert load_sae(write_coder(tmp_path / "null_ef", t, expansion_factor=None)).cfg.d_sae == N
    with pytest.raises(ValueError, match=r"nan/sae\.safetensors: tensors hold NaN"):  # the file it read
        load_sae(write_coder(tmp_path / "nan", {**t, "W_dec": t["W_dec"].clone().fill_(float("nan"))}))


def test_hub_layout_loads_by_hookpoint_subfolder(tmp_path, gen, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    t = random_coder(gen)
    files = {}
    for hookpoint in ("layers.3", "layers.6"):
        folder = write_coder(tmp_path / "src" / hookpoint, t, k=K if hookpoint == "layers.6" else 2)
        files.update({f"{hookpoint}/{f.name}": f for f in folder.iterdir()})
    put_in_hf_cache(tmp_path / "cache", "eai-test/sae-tiny", files)
    a = load_sae("eai-test/sae-tiny", subfolder="layers.6", cache_dir=tmp_path / "cache")
    b = load_sae("eai-test/sae-tiny/layers.3", cache_dir=tmp_path / "cache", revision=COMMIT)
    assert (a.cfg.k, b.cfg.k, a.cfg.metadata["hook_layer"], b.cfg.metadata["hook_layer"]) == (K, 2, 6, 3)
    assert a.cfg.metadata["loaded_from"]["subfolder"] == "layers.6"
    x = torch.randn(16, D_IN, generator=gen)
    torch.testing.assert_close(a(x).double(), reference(t, x)[1], rtol=1e-5, atol=1e-5)
    with pytest.raises(FileNotFoundError, match=r"sae-tiny/layers\.9/cfg\.json .*config\.json \+ ae\.pt"):
        load_sae("eai-test/sae-tiny", subfolder="layers.9", cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match=r"subfolders \['layers\.3', 'layers\.6'\]: pass subfolder="):
        load_sae(tmp_path / "src")  # a local multi-hookpoint folder (a sparsify run or hub snapshot)


def make_topk(seed: int = 0) -> TopKSAE:
    torch.manual_seed(seed)
    sae = TopKSAE(TopKConfig(d_in=D_IN, d_sae=N, k=K, metadata={"model_name": "tiny"}))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return sae.eval()


@pytest.mark.parametrize("transcoder", [False, True])
def test_export_writes_sparsify_names_and_round_trips(tmp_path, transcoder):
    """A TopK SAE (one loaded by an older saelab from a sparsify transcoder says so in its metadata)."""
    sae = make_topk()
    sae.cfg.metadata["transcoder"] = transcoder
    folder = export_sparsify(sae, tmp_path / "layers.2")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg == {
        "activation": "topk",
        "expansion_factor": N // D_IN,
        "normalize_decoder": True,
        "num_latents": N,
        "k": K,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": transcoder,
        "d_in": D_IN,
    }
    t = load_file(str(folder / "sae.safetensors"))
    p = {k: v.double() for k, v in sae.state_dict().items()}
    bias = p["b_enc"] - p["b_dec"] @ p["W_enc"] if transcoder else p["b_enc"]
    torch.testing.assert_close(t["encoder.bias"].double(), bias, rtol=0, atol=1e-6)
    assert torch.equal(t["encoder.weight"], sae.W_enc.T) and torch.equal(t["W_dec"], sae.W_dec)
    x = torch.randn(32, D_IN)
    torch.testing.assert_close(sae(x).double(), reference(t, x, transcoder)[1], rtol=1e-5, atol=1e-5)
    back = load_sae(folder)
    torch.testing.assert_close(back(x), sae(x), rtol=1e-6, atol=1e-6)
    assert type(back) is (transcoder_class("topk") if transcoder else TopKSAE)


def test_export_refuses_variants_sparsify_lacks(tmp_path):
    with pytest.raises(ValueError, match=r"saelab's 'relu' has no sparsify equivalent"):
        export_sparsify(ReLUSAE(ReLUConfig(d_in=D_IN, d_sae=N)), tmp_path / "relu")
    wide = transcoder_class("topk")(
        transcoder_class("topk").config_class(d_in=D_IN, d_out=D_IN + 1, d_sae=N, k=K)
    )
    with pytest.raises(ValueError, match=r"maps d_in=12 to d_out=13; export it with export_saelens"):
        export_sparsify(wide, tmp_path / "wide")
    assert not (tmp_path / "relu").exists() and not (tmp_path / "wide").exists()


# ------------------------------------------------------------------ against the real sparsify package
def random_sparsify_coder(gen: torch.Generator, **cfg):
    coder = sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(num_latents=N, k=K, **cfg))
    with torch.no_grad():
        for p in coder.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return coder


def sparsify_outputs(coder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense codes [B, N], decoded output [B, D_IN]) as sparsify computes them."""
    with torch.no_grad():
        acts, idx, _ = coder.encode(x)
        return torch.zeros(x.shape[0], N).scatter_(1, idx, acts), coder.decode(acts, idx)


SPARSIFY_CONFIGS = [
    {},
    {"multi_topk": True},
    {"transcode": True},
    {"transcode": True, "skip_connection": True},
    {"skip_connection": True},
]


@needs_sparsify
@pytest.mark.parametrize("cfg", SPARSIFY_CONFIGS)
def test_coder_saved_by_sparsify_gives_its_outputs_and_goes_back(tmp_path, gen, cfg):
    """sparsify's own forward (skip term included) in saelab, and saelab's export of it back in sparsify."""
    coder = random_sparsify_coder(gen, **cfg)
    coder.save_to_disk(tmp_path / "layers.4")
    sae = load_sae(tmp_path / "layers.4")
    x = torch.randn(64, D_IN, generator=gen) * 2
    z, out = sparsify_outputs(coder, x)
    with torch.no_grad():  # decoders sum the k rows in different orders: output agrees to float32 rounding
        want = out if cfg.get("multi_topk") else coder(x).sae_out  # multi_topk's forward decodes 4k latents
        torch.testing.assert_close(sae.encode(x), z, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sae(x), want, rtol=1e-5, atol=1e-5)
    export_sparsify(sae, tmp_path / "back" / "layers.4")
    again = sparsify.SparseCoder.load_from_disk(tmp_path / "back" / "layers.4")
    same = {k: v for k, v in vars(again.cfg).items() if k != "expansion_factor"}  # training-only, from d_sae
    assert same == {k: v for k, v in vars(coder.cfg).items() if k != "expansion_factor"}
    with torch.no_grad():
        torch.testing.assert_close(again(x).sae_out, coder(x).sae_out, rtol=1e-5, atol=1e-5)


@needs_sparsify
def test_export_loads_in_sparsify_with_the_same_outputs(tmp_path):
    sae, other = make_topk(0), make_topk(1)
    other.cfg.k = 3
    export_sparsify(sae, tmp_path / "run" / "layers.0")
    export_sparsify(other, tmp_path / "run" / "layers.1")
    coders = sparsify.SparseCoder.load_many(str(tmp_path / "run"), local=True)
    assert sorted(coders) == ["layers.0", "layers.1"] and coders["layers.1"].cfg.k == 3
    x = torch.randn(64, D_IN) * 2
    for name, ours in (("layers.0", sae), ("layers.1", other)):
        z, out = sparsify_outputs(coders[name], x)
        with torch.no_grad():
            torch.testing.assert_close(z, ours.encode(x), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(out, ours(x), rtol=1e-5, atol=1e-5)
