"""dictionary_learning's on-disk format (ae.pt + config.json), both directions.

Hand-written folders are checked against float64 formulas of each dict_class's inference rule (always run).
When the `dictionary-learning` package is importable, SAEs saved from its classes must give their own
encode/decode outputs in saelab, and saelab exports must load in them with the same outputs. Its full
dependencies would replace torch (nnsight 0.3), so install it with `pip install --no-deps dictionary-learning`:
only its package __init__ needs nnsight, and the SAE classes are then imported without running it.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from saelab import load_sae
from saelab.io import export_dictionary_learning
from saelab.io.dictionary_learning import variant_for
from saelab.sae.batchtopk import BatchTopKConfig, BatchTopKSAE
from saelab.sae.gated import GatedConfig, GatedSAE
from saelab.sae.jumprelu import JumpReLUConfig, JumpReLUSAE
from saelab.sae.mp import MatchingPursuitSAE, MPConfig
from saelab.sae.relu import ReLUConfig, ReLUSAE
from saelab.sae.topk import TopKConfig, TopKSAE

D, N, K = 12, 40, 5


def import_peer() -> dict[str, type] | None:
    """dictionary_learning's SAE classes by dict_class name, or None if the package is not installed."""
    spec = importlib.util.find_spec("dictionary_learning")
    if spec is None:
        return None
    try:
        import dictionary_learning  # noqa: F401
    except ImportError:  # a --no-deps install: the package __init__ imports nnsight for its activation buffer
        sys.modules["dictionary_learning"] = importlib.util.module_from_spec(spec)
    from dictionary_learning.dictionary import (
        AutoEncoder,
        AutoEncoderNew,
        GatedAutoEncoder,
        JumpReluAutoEncoder,
    )
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE as PeerBatchTopK
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKSAE
    from dictionary_learning.trainers.top_k import AutoEncoderTopK

    classes = (AutoEncoder, AutoEncoderNew, AutoEncoderTopK, PeerBatchTopK, MatryoshkaBatchTopKSAE)
    return {c.__name__: c for c in (*classes, JumpReluAutoEncoder, GatedAutoEncoder)}


try:
    PEER = import_peer()
    WHY = "dictionary-learning is not installed (pip install --no-deps dictionary-learning)"
except ImportError as err:  # installed, but its classes moved: the peer checks cannot run
    PEER, WHY = None, f"dictionary-learning is installed but its SAE classes did not import ({err})"
needs_peer = pytest.mark.skipif(PEER is None, reason=WHY)


def randn(gen: torch.Generator, *shape: int, scale: float = 0.3) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale


def write_folder(path: Path, dict_class: str, state: dict[str, torch.Tensor], **trainer) -> Path:
    path.mkdir(parents=True)
    torch.save(state, path / "ae.pt")
    fields = {"dict_class": dict_class, "activation_dim": D, "dict_size": N, "lm_name": "tiny", "layer": 3}
    (path / "config.json").write_text(
        json.dumps({"trainer": {**fields, **trainer}, "buffer": {"ctx_len": 8}})
    )
    return path


def topk_rows(r: torch.Tensor, k: int) -> torch.Tensor:
    """Keep each row's k largest entries, by sorting in a loop."""
    out = torch.zeros_like(r)
    for row in range(r.shape[0]):
        keep = r[row].argsort(descending=True)[:k]
        out[row, keep] = r[row, keep]
    return out


def random_state(dict_class: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A random ae.pt state dict of `dict_class` (names and shapes as dictionary_learning saves them)."""
    if dict_class in ("JumpReluAutoEncoder", "MatryoshkaBatchTopKSAE"):  # W_enc [D, N], W_dec [N, D]
        s = {
            "W_enc": randn(gen, D, N),
            "b_enc": randn(gen, N),
            "W_dec": randn(gen, N, D),
            "b_dec": randn(gen, D),
        }
        if dict_class == "JumpReluAutoEncoder":
            s["threshold"] = torch.rand(N, generator=gen) * 0.3
        else:
            s.update(k=torch.tensor(K, dtype=torch.int32), threshold=torch.tensor(0.2))
            s["group_sizes"] = torch.tensor([8, 32])
        return s
    if dict_class == "GatedAutoEncoder":
        names = ("decoder_bias", "gate_bias", "mag_bias", "r_mag")
        shapes = {"decoder_bias": (D,)}
        return {
            "encoder.weight": randn(gen, N, D),
            "decoder.weight": randn(gen, D, N),
            **{name: randn(gen, *shapes.get(name, (N,))) for name in names},
        }
    s = {
        "encoder.weight": randn(gen, N, D),
        "encoder.bias": randn(gen, N),
        "decoder.weight": randn(gen, D, N),
    }
    if dict_class == "AutoEncoder":
        s["bias"] = randn(gen, D)
    elif dict_class == "AutoEncoderNew":
        s["decoder.bias"] = randn(gen, D)
    else:
        s.update(b_dec=randn(gen, D), k=torch.tensor(K, dtype=torch.int32), threshold=torch.tensor(0.25))
    return s


def reference(dict_class: str, state: dict[str, torch.Tensor], x: torch.Tensor):
    """dict_class's inference rule in float64: (codes [B, N], output [B, D])."""
    p = {k: v.double() for k, v in state.items()}
    x = x.double()
    if dict_class == "JumpReluAutoEncoder":
        pre = x @ p["W_enc"] + p["b_enc"]
        z = (pre * (pre > p["threshold"])).relu()
        return z, z @ p["W_dec"] + p["b_dec"]
    if dict_class == "MatryoshkaBatchTopKSAE":
        r = ((x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]).relu()
        z = r * (r > p["threshold"])
        return z, z @ p["W_dec"] + p["b_dec"]
    if dict_class == "GatedAutoEncoder":  # gate and magnitude paths on the same projection
        u = (x - p["decoder_bias"]) @ p["encoder.weight"].T
        z = (u + p["gate_bias"] > 0) * (p["r_mag"].exp() * u + p["mag_bias"]).relu()
        return z, z @ p["decoder.weight"].T + p["decoder_bias"]
    b_dec = p.get("bias", p.get("decoder.bias", p.get("b_dec")))
    centred = x if dict_class == "AutoEncoderNew" else x - b_dec  # AutoEncoderNew: encoder(x), no centring
    r = (centred @ p["encoder.weight"].T + p["encoder.bias"]).relu()
    if dict_class == "AutoEncoderTopK":
        r = topk_rows(r, K)
    elif dict_class == "BatchTopKSAE":
        r = r * (r > p["threshold"])
    return r, r @ p["decoder.weight"].T + b_dec


CLASSES = {
    "AutoEncoder": ReLUSAE,
    "AutoEncoderNew": ReLUSAE,
    "AutoEncoderTopK": TopKSAE,
    "BatchTopKSAE": BatchTopKSAE,
    # the Matryoshka variant where one exports this class, else BatchTopK (the same inference rule)
    "MatryoshkaBatchTopKSAE": variant_for("MatryoshkaBatchTopKSAE"),
    "JumpReluAutoEncoder": JumpReLUSAE,
    "GatedAutoEncoder": GatedSAE,
}
#: saelab architecture -> the dict_class export writes.
EXPORTED = {
    "relu": "AutoEncoder",
    "topk": "AutoEncoderTopK",
    "batchtopk": "BatchTopKSAE",
    "jumprelu": "JumpReluAutoEncoder",
    "gated": "GatedAutoEncoder",
}


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def make(arch: str) -> ReLUSAE | TopKSAE | BatchTopKSAE | JumpReLUSAE:
    """A saelab SAE with random parameters (and a trained-looking BatchTopK threshold)."""
    torch.manual_seed(0)
    meta = {"model_name": "tiny", "hook_name": "blocks.3.hook_resid_post", "hook_layer": 3}
    sae = {
        "relu": lambda: ReLUSAE(ReLUConfig(d_in=D, d_sae=N, metadata=meta)),
        "topk": lambda: TopKSAE(TopKConfig(d_in=D, d_sae=N, k=K, metadata=meta)),
        "batchtopk": lambda: BatchTopKSAE(BatchTopKConfig(d_in=D, d_sae=N, k=K, metadata=meta)),
        "jumprelu": lambda: JumpReLUSAE(JumpReLUConfig(d_in=D, d_sae=N, metadata=meta)),
        "gated": lambda: GatedSAE(GatedConfig(d_in=D, d_sae=N, metadata=meta)),
    }[arch]()
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.rand_like(p) * 0.3 if name == "threshold" else torch.randn_like(p) * 0.3)
        if arch == "batchtopk":
            sae.threshold.fill_(0.2)
    return sae.eval()


def assert_outputs(sae, codes: torch.Tensor, out: torch.Tensor, x: torch.Tensor, tol: float = 1e-5) -> None:
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x).to(codes.dtype), codes, rtol=tol, atol=tol)
        torch.testing.assert_close(sae(x).to(out.dtype), out, rtol=tol, atol=tol)


# -------------------------------------------------------------- hand-written folders (no package needed)
@pytest.mark.parametrize("dict_class", sorted(CLASSES))
def test_folder_matches_formula(tmp_path, gen, dict_class):
    state = random_state(dict_class, gen)
    k = {"k": K} if "k" in state else {}
    sae = load_sae(write_folder(tmp_path / "trainer_0", dict_class, state, **k))
    assert type(sae) is CLASSES[dict_class] and (sae.d_in, sae.d_sae) == (D, N)
    x = randn(gen, 64, D, scale=2.0)
    codes, out = reference(dict_class, state, x)
    assert 0 < codes.count_nonzero() < codes.numel()  # the rule is exercised: neither all zero nor dense
    assert_outputs(sae, codes, out, x)
    meta = sae.cfg.metadata
    assert (meta["model_name"], meta["hook_layer"]) == ("tiny", 3)
    assert meta["dictionary_learning"]["buffer"] == {"ctx_len": 8}


def test_unsupported_and_inconsistent_folders_are_named(tmp_path, gen):
    state = random_state("AutoEncoderTopK", gen)
    with pytest.raises(ValueError, match=r"trainer\.dict_class='CrossCoder' is not supported"):
        load_sae(write_folder(tmp_path / "crosscoder", "CrossCoder", state))
    with pytest.raises(ValueError, match=r"trainer\.k=7 in the config but .*ae\.pt has k=5"):
        load_sae(write_folder(tmp_path / "k", "AutoEncoderTopK", state, k=7))
    with pytest.raises(ValueError, match=r"trainer\.dict_size=41 but ae\.pt has 40"):
        load_sae(write_folder(tmp_path / "n", "AutoEncoderTopK", state, dict_size=N + 1))
    with pytest.raises(ValueError, match=r"a AutoEncoder has exactly \['bias', "):
        load_sae(write_folder(tmp_path / "keys", "AutoEncoder", state))
    untrained = {**state, "threshold": torch.tensor(-1.0)}
    with pytest.raises(ValueError, match=r"threshold=-1\.0: the BatchTopKSAE never estimated"):
        load_sae(write_folder(tmp_path / "untrained", "BatchTopKSAE", untrained))
    int_decoder = {
        **state,
        "decoder.weight": state["decoder.weight"].round().int(),
    }  # the first tensor is float
    with pytest.raises(
        ValueError, match=r"int_decoder/ae\.pt: tensors decoder\.weight \(torch\.int32\) are not"
    ):
        load_sae(write_folder(tmp_path / "int_decoder", "AutoEncoderTopK", int_decoder))
    with pytest.raises(ValueError, match=r"vector_k/ae\.pt: k holds 2 values; a AutoEncoderTopK stores one"):
        load_sae(write_folder(tmp_path / "vector_k", "AutoEncoderTopK", {**state, "k": torch.tensor([5, 5])}))
    with pytest.raises(ValueError, match=r"trainer\.dict_class=\['AutoEncoder'\] is not supported"):
        load_sae(write_folder(tmp_path / "listed", ["AutoEncoder"], state))
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder"}}))
    (tmp_path / "corrupt" / "ae.pt").write_bytes(b"truncated")
    with pytest.raises(ValueError, match=r"could not read .*corrupt/ae\.pt"):
        load_sae(tmp_path / "corrupt")
    with pytest.raises(
        FileNotFoundError, match=r"config\.json \+ ae\.pt \(dictionary_learning\).*\['corrupt', "
    ):
        load_sae(tmp_path)  # the parent of several SAE folders lists them


@pytest.mark.parametrize("arch", sorted(EXPORTED))
def test_export_matches_the_peer_formula_and_round_trips(tmp_path, arch):
    sae = make(arch)
    folder = export_dictionary_learning(sae, tmp_path / "trainer_0")
    trainer = json.loads((folder / "config.json").read_text())["trainer"]
    assert (trainer["dict_class"], trainer["activation_dim"], trainer["dict_size"]) == (EXPORTED[arch], D, N)
    assert (trainer["lm_name"], trainer["layer"], trainer.get("k", K)) == ("tiny", 3, K)
    state = torch.load(folder / "ae.pt", weights_only=True)
    assert set(state) == set(random_state(EXPORTED[arch], torch.Generator()))
    x = torch.randn(64, D) * 2
    assert_outputs(sae, *reference(EXPORTED[arch], state, x), x)
    back = load_sae(folder)
    assert type(back) is type(sae)
    assert_outputs(back, sae.encode(x), sae(x), x, tol=1e-6)


def test_export_refuses_variants_the_peer_lacks(tmp_path):
    with pytest.raises(ValueError, match=r"no equivalent of saelab's 'mp' SAE"):
        export_dictionary_learning(MatchingPursuitSAE(MPConfig(d_in=D, d_sae=N, k=K)), tmp_path / "mp")
    untrained = BatchTopKSAE(BatchTopKConfig(d_in=D, d_sae=N, k=K))
    with pytest.raises(ValueError, match="no usable inference threshold"):
        export_dictionary_learning(untrained, tmp_path / "btk")
    assert not (tmp_path / "mp").exists() and not (tmp_path / "btk").exists()


# ------------------------------------------------------------ against the real dictionary_learning classes
def peer_module(dict_class: str, gen: torch.Generator):
    """An instance of dictionary_learning's `dict_class` with random parameters and a set threshold."""
    cls = PEER[dict_class]
    if dict_class in ("AutoEncoder", "AutoEncoderNew", "JumpReluAutoEncoder", "GatedAutoEncoder"):
        module = cls(D, N)
    elif dict_class == "MatryoshkaBatchTopKSAE":
        module = cls(D, N, K, group_sizes=[8, 32])
    else:
        module = cls(D, N, K)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.rand(p.shape, generator=gen) * 0.3 if name == "threshold" else randn(gen, *p.shape))
        if "threshold" in dict(module.named_buffers()):
            module.threshold.fill_(0.2)
    return module.eval()


@needs_peer
@pytest.mark.parametrize("dict_class", sorted(CLASSES))
def test_sae_saved_by_dictionary_learning_gives_its_outputs(tmp_path, gen, dict_class):
    module = peer_module(dict_class, gen)
    k = {"k": K} if hasattr(module, "k") else {}
    sae = load_sae(write_folder(tmp_path / "ae", dict_class, module.state_dict(), **k))
    x = randn(gen, 64, D, scale=2.0)
    with torch.no_grad():
        codes = module.encode(x)
        assert_outputs(sae, codes, module.decode(codes), x)


@needs_peer
@pytest.mark.parametrize("arch", sorted(EXPORTED))
def test_export_loads_in_dictionary_learning_with_the_same_outputs(tmp_path, arch):
    sae = make(arch)
    folder = export_dictionary_learning(sae, tmp_path / "trainer_0")
    trainer = json.loads((folder / "config.json").read_text())["trainer"]
    cls = PEER[trainer["dict_class"]]
    x = torch.randn(64, D) * 2
    with torch.no_grad():
        if (
            arch == "relu"
        ):  # from_pretrained rescales decoder columns to unit norm (codes change by the norms)
            module = cls.from_pretrained(folder / "ae.pt", normalize_decoder=False)
            rescaled = cls.from_pretrained(folder / "ae.pt")
            torch.testing.assert_close(rescaled(x), sae(x), rtol=1e-5, atol=1e-5)
        elif arch in ("jumprelu", "gated"):
            module = cls.from_pretrained(folder / "ae.pt")
        else:  # what dictionary_learning.utils.load_dictionary does for these classes
            module = cls.from_pretrained(folder / "ae.pt", k=trainer["k"])
        codes = module.encode(x)
        assert_outputs(sae, codes, module.decode(codes), x)
