"""load_sae from every kind of source, its errors, and reading feature activations for texts."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from saelab import load_sae
from saelab.sae.jumprelu import JumpReLUConfig, JumpReLUSAE
from saelab.sae.registry import available_architectures, get_sae_class
from saelab.sae.relu import ReLUConfig, ReLUSAE
from saelab.sae.topk import TopKConfig, TopKSAE
from saelab.sources.synthetic import SyntheticConfig, SyntheticSource
from saelab.splice.features import read_features
from saelab.train.config import TrainerConfig
from saelab.train.trainer import Trainer

D_IN, D_SAE, K = 16, 48, 4
META = {"model_name": "tiny", "hook_name": "blocks.3.hook_resid_post", "training_tokens": 4096}


def make(arch: str, seed: int = 0):
    """A saelab SAE with random, nonzero parameters of every kind."""
    torch.manual_seed(seed)
    sae = {
        "relu": lambda: ReLUSAE(ReLUConfig(d_in=D_IN, d_sae=D_SAE, metadata=dict(META))),
        "topk": lambda: TopKSAE(TopKConfig(d_in=D_IN, d_sae=D_SAE, k=K, metadata=dict(META))),
        "jumprelu": lambda: JumpReLUSAE(JumpReLUConfig(d_in=D_IN, d_sae=D_SAE, metadata=dict(META))),
    }[arch]()
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.rand_like(p) * 0.2 if name == "threshold" else torch.randn_like(p) * 0.3)
    return sae.eval()


def assert_same_params(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for name in sa:
        assert torch.equal(sa[name].to(sb[name].dtype), sb[name]), name


# ------------------------------------------------------------------------------------ local directories
@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
def test_directory_round_trip_is_exact(tmp_path, arch):
    sae = make(arch)
    sae.save(tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    assert type(loaded) is type(sae) and loaded.cfg.architecture == arch and not loaded.training
    assert_same_params(loaded, sae)
    x = torch.randn(32, D_IN)
    assert torch.equal(loaded.encode(x), sae.encode(x))
    meta = loaded.cfg.metadata
    assert (meta["model_name"], meta["hook_name"], meta["hook_layer"], meta["training_tokens"]) == (
        "tiny",
        "blocks.3.hook_resid_post",
        3,
        4096,
    )
    assert meta["loaded_from"] == {"kind": "directory", "path": str(tmp_path / "sae")}


@pytest.mark.parametrize("arch", sorted({get_sae_class(n).architecture for n in available_architectures()}))
def test_every_registered_variant_round_trips(tmp_path, arch):
    """Every variant's own save (parameters and persistent buffers) comes back bit for bit."""
    cls = get_sae_class(arch)
    torch.manual_seed(1)
    sae = cls(cls.config_class(d_in=D_IN, d_sae=D_SAE, **({"d_out": 5} if cls.is_transcoder else {})))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        for name, b in sae.named_buffers():
            if name == "threshold" and b.isnan().all():  # BatchTopK before training
                b.fill_(0.1)
    sae.eval().save(tmp_path / arch)
    loaded = load_sae(tmp_path / arch)
    assert type(loaded) is cls
    for name, value in sae.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0, equal_nan=True)
    x = torch.randn(16, D_IN)
    torch.testing.assert_close(loaded(x), sae(x), rtol=0, atol=0)


def test_dtype_is_applied_and_recorded(tmp_path):
    make("topk").save(tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae", dtype="float64")
    assert all(p.dtype == torch.float64 for p in loaded.parameters()) and loaded.cfg.dtype == "float64"
    assert_same_params(loaded, make("topk"))


@pytest.mark.gpu
def test_device_is_applied(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    make("jumprelu").save(tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae", device="cuda", dtype="bfloat16")
    assert all(p.is_cuda and p.dtype == torch.bfloat16 for p in loaded.parameters())


def test_missing_files_are_named(tmp_path):
    folder = make("relu").save(tmp_path / "sae")
    (folder / "sae_weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"sae_weights\.safetensors is missing"):
        load_sae(folder)
    (folder / "cfg.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"cfg\.json is missing"):
        load_sae(folder)


def test_corrupt_and_unknown_configs_are_named(tmp_path):
    folder = make("relu").save(tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "architecture": "nope"}))
    with pytest.raises(ValueError, match=r"architecture='nope' contradicts saelab_architecture='relu'"):
        load_sae(folder)
    cfg.pop("saelab_architecture")  # a SAELens-style file: `architecture` alone decides
    (folder / "cfg.json").write_text(json.dumps({**cfg, "architecture": "nope"}))
    with pytest.raises(ValueError, match=r"cfg\.json: architecture='nope' is unknown"):
        load_sae(folder)
    (folder / "cfg.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "architecture"}))
    with pytest.raises(ValueError, match="no 'architecture' field"):
        load_sae(folder)
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_sae(folder)
    (folder / "cfg.json").write_text(json.dumps({**cfg, "d_sae": D_SAE + 1}))
    with pytest.raises(ValueError, match=r"does not match .*wrong shapes.*'W_enc'"):
        load_sae(folder)
    (folder / "cfg.json").write_text(json.dumps({**cfg, "architecture": "jumprelu"}))
    with pytest.raises(ValueError, match=r"missing tensors \['threshold'\]"):
        load_sae(folder)
    (folder / "sae_weights.safetensors").write_bytes(b"truncated")
    with pytest.raises(ValueError, match=r"sae_weights\.safetensors.*corrupt"):
        load_sae(folder)


def test_neither_directory_nor_repo_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_sae(tmp_path / "absent")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/cfg\.json is missing"):
        load_sae(empty)


def test_required_config_fields_are_not_defaulted(tmp_path):
    folder = make("topk").save(tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "k"}))
    with pytest.raises(ValueError, match=r"cfg\.json has no \['k'\] field.*topk SAE needs"):
        load_sae(folder)


@pytest.mark.parametrize(("name", "bad"), [("W_dec", float("nan")), ("b_enc", float("inf"))])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, name, bad):
    sae = make("relu")
    with torch.no_grad():
        getattr(sae, name).view(-1)[3] = bad
    folder = sae.save(tmp_path / "sae")
    with pytest.raises(
        ValueError, match=rf"sae_weights\.safetensors: tensors hold NaN or Inf: {name} \(1 of"
    ):
        load_sae(folder)


@pytest.fixture
def no_hub(monkeypatch):
    """Fail the test if anything asks the hub."""
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"the hub was asked for {args}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)


@pytest.mark.parametrize(
    "source", ["outputs/my_run", "outputs/a/b/c", "./my_run/sae", "~/no_such_saelab_dir/x"]
)
def test_local_looking_missing_path_fails_at_once_naming_it(tmp_path, monkeypatch, no_hub, source):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()  # 'outputs/...' is then a local path, not a hub id
    with pytest.raises(FileNotFoundError, match=rf"{source} is not a directory \(.* does not exist\)"):
        load_sae(source)


def test_missing_repo_id_offline_mentions_both_readings(hub_cache):
    with pytest.raises(FileNotFoundError) as info:
        load_sae("nobody/absent_sae", cache_dir=hub_cache)
    message = str(info.value)
    assert "nobody/absent_sae/cfg.json" in message and "HF_HUB_OFFLINE is set" in message
    assert "no local directory" in message and "absent_sae" in message


def test_unreachable_hub_is_asked_once(monkeypatch):
    """Without a connection each hub call retries for a while: one failed call ends the search."""
    import huggingface_hub
    import huggingface_hub.constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def unreachable(*args, **kwargs):
        calls.append(args)
        raise LocalEntryNotFoundError("connection error")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(FileNotFoundError, match=r"nobody/absent_sae/cfg\.json .*hub could not be reached"):
        load_sae("nobody/absent_sae")
    assert len(calls) == 1


# -------------------------------------------------------------------- saelab training runs / checkpoints
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> tuple[Path, Trainer]:
    """A 6-step TopK run on planted features with checkpoints at steps 2 and 4 and the final SAE."""
    out = tmp_path_factory.mktemp("run")
    source = SyntheticSource(SyntheticConfig(d_in=D_IN, n_features=64, seed=3))
    sae = TopKSAE(TopKConfig(d_in=D_IN, d_sae=D_SAE, k=K, metadata=dict(META)))
    cfg = TrainerConfig(total_tokens=6 * 64, batch_size=64, checkpoint_every=2, device="cpu", log_every=2)
    trainer = Trainer(sae, cfg, output_dir=out)
    trainer.result = trainer.fit(source)
    return out, trainer


def test_run_directory_loads_the_final_sae(run_dir):
    out, trainer = run_dir
    loaded = load_sae(out)
    assert_same_params(loaded, trainer.result.sae)
    meta = loaded.cfg.metadata
    assert meta["training_tokens"] == 6 * 64 and "fvu" in meta["final_metrics"]
    assert meta["input_scale_folded"] == pytest.approx(trainer.input_scale)
    assert meta["loaded_from"] == {"kind": "directory", "path": str(out / "sae")}


def checkpoint_reference(step_dir: Path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, reconstruction) of raw x [B, d] in float64 from a checkpoint's training-space weights and
    input scale s: the SAE trained on s * x, so x_hat = SAE(s * x) / s."""
    raw = {k: v.double() for k, v in load_file(str(step_dir / "training_weights.safetensors")).items()}
    s = torch.load(step_dir / "trainer_state.pt", weights_only=True)["input_scale"]
    assert s != pytest.approx(1.0)  # the fold is visible
    pre = (s * x - raw["b_dec"]) @ raw["W_enc"] + raw["b_enc"]
    values, idx = pre.topk(K, dim=-1)
    z_ref = torch.zeros_like(pre).scatter_(1, idx, values.clamp_min(0))
    return z_ref, (z_ref @ raw["W_dec"] + raw["b_dec"]) / s


def test_checkpoint_is_loaded_with_its_input_scale_folded(run_dir):
    out, trainer = run_dir
    step_dir = out / "checkpoints" / "step_000000004"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000000002", "step_000000004"]
    loaded = load_sae(out / "checkpoints")  # the newest checkpoint
    x = torch.randn(64, D_IN, dtype=torch.float64) * 3
    z_ref, x_hat_ref = checkpoint_reference(step_dir, x)
    torch.testing.assert_close(loaded.encode(x.float()).double(), z_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loaded(x.float()).double(), x_hat_ref, atol=1e-4, rtol=1e-4)
    meta = loaded.cfg.metadata
    assert (meta["checkpoint_step"], meta["training_tokens"]) == (4, 4 * 64)
    assert meta["loaded_from"] == {"kind": "checkpoint", "path": str(step_dir)}


def test_old_layout_checkpoint_is_still_folded(run_dir, tmp_path):
    """An older checkpoint kept only training-space weights, in sae_weights.safetensors."""
    out, _ = run_dir
    new, old = out / "checkpoints" / "step_000000004", tmp_path / "step_000000004"
    shutil.copytree(new, old)
    (old / "training_weights.safetensors").rename(old / "sae_weights.safetensors")
    cfg = json.loads((old / "cfg.json").read_text())  # older checkpoints saved the unfolded training SAE
    del cfg["metadata"]["input_scale_folded"]
    (old / "cfg.json").write_text(json.dumps(cfg))
    x = torch.randn(64, D_IN, dtype=torch.float64) * 3
    z_ref, x_hat_ref = checkpoint_reference(new, x)
    loaded = load_sae(old)
    torch.testing.assert_close(loaded(x.float()).double(), x_hat_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loaded.encode(x.float()).double(), z_ref, atol=1e-4, rtol=1e-4)


def test_checkpoint_missing_its_training_weights_is_refused_not_folded_twice(run_dir, tmp_path):
    """sae_weights.safetensors of a checkpoint has the scale folded in; without training_weights.safetensors
    it must not be taken for an older checkpoint's training-space weights (by load_sae or by a resume)."""
    out, _ = run_dir
    broken = tmp_path / "step_000000004"
    shutil.copytree(out / "checkpoints" / "step_000000004", broken)
    (broken / "training_weights.safetensors").unlink()
    message = r"training_weights\.safetensors is missing, but .*cfg\.json says .* folded in: the checkpoint is damaged"
    with pytest.raises(FileNotFoundError, match=message):
        load_sae(broken)
    cfg = TrainerConfig(total_tokens=6 * 64, batch_size=64, device="cpu")
    with pytest.raises(FileNotFoundError, match=message):
        Trainer.from_checkpoint(broken, cfg)


def test_checkpoint_without_input_scale_names_the_file(run_dir, tmp_path):
    out, _ = run_dir
    broken = tmp_path / "step_000000004"
    shutil.copytree(out / "checkpoints" / "step_000000004", broken)
    state = torch.load(broken / "trainer_state.pt", weights_only=True)
    del state["input_scale"]
    torch.save(state, broken / "trainer_state.pt")
    with pytest.raises(ValueError, match=r"trainer_state\.pt has no entry 'input_scale'.*load another"):
        load_sae(broken)
    cfg = TrainerConfig(total_tokens=6 * 64, batch_size=64, device="cpu")
    with pytest.raises(ValueError, match=r"trainer_state\.pt has no \['input_scale'\].*another checkpoint"):
        Trainer.from_checkpoint(broken, cfg)


def test_resume_still_reads_training_space_weights(run_dir):
    out, _ = run_dir
    cfg = TrainerConfig(total_tokens=6 * 64, batch_size=64, checkpoint_every=2, device="cpu", log_every=2)
    resumed = Trainer.from_checkpoint(out, cfg)
    raw = load_file(str(out / "checkpoints" / "step_000000004" / "training_weights.safetensors"))
    assert resumed.step == 4
    for name, value in raw.items():
        assert torch.equal(resumed.sae.state_dict()[name], value), name


# --------------------------------------------------------------------------- Hugging Face hub (offline)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def put_in_hf_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> None:
    """Lay files out as huggingface_hub's cache does: blobs by content hash, snapshot symlinks, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "blobs").mkdir(exist_ok=True)
    for rel, src in files.items():
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = repo / "snapshots" / COMMIT / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    folder = make("jumprelu").save(tmp_path / "src")
    cache = tmp_path / "hf_cache"
    put_in_hf_cache(
        cache, "saelab-test/tiny-saes", {f"layer_3/{f.name}": f for f in folder.iterdir() if f.is_file()}
    )
    return cache


def test_hub_repo_and_subfolder_load_from_the_cache(hub_cache):
    a = load_sae("saelab-test/tiny-saes", subfolder="layer_3", cache_dir=hub_cache)
    b = load_sae("saelab-test/tiny-saes/layer_3", cache_dir=hub_cache, revision=COMMIT, dtype="float64")
    assert_same_params(a, make("jumprelu"))
    assert_same_params(b, make("jumprelu"))
    assert a.cfg.metadata["loaded_from"] == {
        "kind": "hub",
        "repo_id": "saelab-test/tiny-saes",
        "subfolder": "layer_3",
        "revision": "main",
    }
    assert a.cfg.metadata["hook_layer"] == 3


def test_hub_missing_entry_names_the_file(hub_cache):
    with pytest.raises(FileNotFoundError, match=r"saelab-test/tiny-saes/layer_9/cfg\.json"):
        load_sae("saelab-test/tiny-saes", subfolder="layer_9", cache_dir=hub_cache)
    with pytest.raises(FileNotFoundError, match=r"saelab-test/other/cfg\.json"):
        load_sae("saelab-test/other", cache_dir=hub_cache)


# ------------------------------------------------------------------------------ feature activations
@pytest.fixture(scope="module")
def tiny_lm():
    """A 2-layer GPT-2 with random weights and a whitespace word-level tokenizer (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2,
        n_embd=D_IN,
        n_head=2,
        vocab_size=len(words),
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg).eval(), tokenizer


def test_read_features_matches_per_text_reference(tiny_lm):
    model, tokenizer = tiny_lm
    sae = make("relu")
    texts = ["the cat sat on a mat", "a dog ran", "the dog ran far far away"]
    feats = read_features(model, sae, texts, tokenizer=tokenizer, hook_name="transformer.h.0")
    lengths = [len(t.split()) for t in texts]
    assert feats.acts.shape == (3, max(lengths), D_SAE) and feats.tokens.shape == (3, max(lengths))
    assert feats.mask.sum(dim=1).tolist() == lengths
    p = {k: v.double() for k, v in sae.state_dict().items()}
    for row, text in enumerate(texts):
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():  # block 0's output, each text alone (no padding)
            h = model(ids, output_hidden_states=True).hidden_states[1][0].double()
        z_ref = ((h - p["b_dec"]) @ p["W_enc"] + p["b_enc"]).relu()
        n = lengths[row]
        torch.testing.assert_close(feats.acts[row, :n].double(), z_ref, atol=1e-5, rtol=1e-5)
        assert torch.equal(feats.tokens[row, :n], ids[0])
        assert not feats.acts[row, n:].any()
    assert feats.acts.count_nonzero() > 0


def test_read_features_on_a_transformer_lens_model(tmp_path):
    """A HookedTransformer: texts go through `model.to_tokens` (BOS by default, none with prepend_bos=False) and the
    codes are the float64 encoding of each text's own `run_with_cache` activations at the SAE's hook."""
    from harvest_helpers import tiny_tl

    model = tiny_tl(n_layers=2, tokenizer_dir=tmp_path / "tokenizer")
    hook = "blocks.0.hook_resid_post"
    torch.manual_seed(0)
    sae = ReLUSAE(ReLUConfig(d_in=32, d_sae=D_SAE, metadata={"hook_name": hook}))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    p = {k: v.double() for k, v in sae.state_dict().items()}
    texts = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9 w10"]
    for prepend_bos, bos in ((None, [0]), (False, [])):
        feats = read_features(model, sae, texts, prepend_bos=prepend_bos)
        for row, text in enumerate(texts):
            ids = bos + [3 + int(word[1:]) for word in text.split()]  # <bos>=0, then w0=3, w1=4, ...
            n = len(ids)
            assert feats.tokens[row, :n].tolist() == ids and int(feats.mask[row].sum()) == n
            with torch.no_grad():
                _, cache = model.run_with_cache(torch.tensor([ids]), names_filter=[hook])
            z_ref = ((cache[hook][0].double() - p["b_dec"]) @ p["W_enc"] + p["b_enc"]).relu()
            torch.testing.assert_close(feats.acts[row, :n].double(), z_ref, atol=1e-5, rtol=1e-5)
            assert not feats.acts[row, n:].any()
        assert feats.acts.count_nonzero() > 0


def test_read_features_follows_the_saes_prepend_bos(tiny_lm):
    """An HF tokenizer adds no BOS by itself; an SAE trained with prepend_bos=true gets one in front, and its
    first real token's codes are those of the sequence with BOS (as in training)."""
    from transformers import PreTrainedTokenizerFast

    model, plain = tiny_lm
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=plain.backend_tokenizer, bos_token="<pad>", unk_token="<unk>"
    )
    assert tokenizer("the cat")["input_ids"][0] != tokenizer.bos_token_id  # the tokenizer adds none itself
    sae = make("relu")
    text = "the cat sat"
    ids = [tokenizer.bos_token_id, *tokenizer(text)["input_ids"]]
    p = {k: v.double() for k, v in sae.state_dict().items()}
    with torch.no_grad():
        h = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0].double()
    z_ref = ((h - p["b_dec"]) @ p["W_enc"] + p["b_enc"]).relu()
    for meta, want_ids, want_z in ((True, ids, z_ref), (False, ids[1:], None)):
        sae.cfg.metadata = {**META, "hook_name": "transformer.h.0", "prepend_bos": meta}
        feats = read_features(model, sae, [text], tokenizer=tokenizer)
        assert feats.tokens[0].tolist() == want_ids
        if want_z is not None:
            torch.testing.assert_close(feats.acts[0].double(), want_z, atol=1e-5, rtol=1e-5)
    assert read_features(model, sae, [text], tokenizer=tokenizer, prepend_bos=True).tokens[0].tolist() == ids


def test_read_features_needs_a_hook(tiny_lm):
    model, tokenizer = tiny_lm
    sae = make("relu")
    sae.cfg.metadata = {}
    with pytest.raises(ValueError, match="pass hook_name"):
        read_features(model, sae, ["the cat"], tokenizer=tokenizer)
    with pytest.raises(TypeError, match="list of strings"):
        read_features(model, sae, "the cat", tokenizer=tokenizer, hook_name="transformer.h.0")


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool])
def test_integer_or_bool_weights_are_refused_naming_the_file_and_tensor(tmp_path, dtype):
    sae = TopKSAE(TopKConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    folder = sae.save(tmp_path / "sae")
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    tensors["W_enc"] = (tensors["W_enc"] * 4).to(dtype)
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    with pytest.raises(
        ValueError, match=rf"sae_weights\.safetensors: tensors W_enc \({dtype}\) are not floating point"
    ):
        load_sae(folder)


def test_load_sae_onto_a_missing_gpu_names_the_argument(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    folder = TopKSAE(TopKConfig(d_in=D_IN, d_sae=D_SAE, k=K)).save(tmp_path / "sae")
    with pytest.raises(ValueError, match=r"device='cuda' but torch sees no CUDA GPU here; use device=cpu"):
        load_sae(folder, device="cuda")
    assert load_sae(folder, device="auto").W_dec.device.type == "cpu"
