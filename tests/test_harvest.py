"""Harvesters against each model's own activations: a small TransformerLens model, a small HF Llama, and the
real SmolLM2-135M (offline assets); TransformerLens loading (hub names through `from_pretrained`, local
checkpoints converted) against the transformers model's hidden states and logits; then `saelab train` on live
SmolLM2 activations end to end."""

import json

import huggingface_hub
import pytest
import torch
from harvest_helpers import WORDS, fetch_or_skip, tiny_tl, word_tokenizer
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from saelab.app.cli import main
from saelab.app.config import HarvestRunConfig
from saelab.app.harvest_job import run_harvest
from saelab.data.assets import SHAKESPEARE_GLOB
from saelab.data.tokens import excluded_token_ids, keep_mask
from saelab.harvest.config import ModelSourceConfig
from saelab.harvest.hooked import llama_config
from saelab.harvest.models import load_model, make_harvester
from saelab.harvest.module import ModuleHarvester
from saelab.harvest.names import UnknownHookError
from saelab.harvest.pipeline import HarvestPipeline, harvest_rows
from saelab.harvest.tlens import TransformerLensHarvester, stop_layer

CPU = torch.device("cpu")


class CallCounter:
    """Counts forward calls of a module (to show that layers past the last hook did not run)."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        module.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))


def test_stop_layer():
    assert stop_layer(["blocks.1.hook_resid_post", "blocks.0.attn.hook_z"], 4) == 2
    assert stop_layer(["hook_embed"], 4) == 0
    assert stop_layer(["blocks.3.hook_resid_post"], 4) is None  # the last block: run everything
    assert stop_layer(["blocks.0.hook_resid_post", "ln_final.hook_normalized"], 4) is None


def test_transformer_lens_harvest_equals_run_with_cache():
    model = tiny_tl(n_layers=4)
    tokens = torch.randint(0, model.cfg.d_vocab, (3, 11), generator=torch.Generator().manual_seed(0))
    hooks = ["blocks.1.hook_resid_post", "blocks.0.hook_mlp_out", "blocks.1.attn.hook_z"]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)  # the model's own full run, no filter, no early stop
    late = CallCounter(model.blocks[2])
    acts = TransformerLensHarvester(model, hooks)(tokens)
    assert late.calls == 0  # blocks 2 and 3 were not run
    assert torch.equal(acts["blocks.1.hook_resid_post"], cache["blocks.1.hook_resid_post"])
    assert torch.equal(acts["blocks.0.hook_mlp_out"], cache["blocks.0.hook_mlp_out"])
    z = cache["blocks.1.attn.hook_z"]  # [batch, pos, head, d_head] -> heads concatenated
    assert acts["blocks.1.attn.hook_z"].shape == (3, 11, 4 * 8)
    assert torch.equal(acts["blocks.1.attn.hook_z"], z.reshape(3, 11, -1))


def test_unknown_hook_names_list_near_matches():
    with pytest.raises(UnknownHookError, match=r"blocks\.1\.hook_resid_post"):
        TransformerLensHarvester(tiny_tl(n_layers=2), ["blocks.1.hook_resid_pots"])
    llama = tiny_llama()
    with pytest.raises(UnknownHookError, match=r"Did you mean.*'model\.layers\.1'"):
        ModuleHarvester(llama, ["model.layer.1"])


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def test_module_harvest_equals_hf_hidden_states():
    model = tiny_llama()
    tokens = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = model(
            tokens, output_hidden_states=True
        ).hidden_states  # [embed, layer0, layer1, norm(layer2)]
    head = CallCounter(model.lm_head)
    acts = ModuleHarvester(model, ["model.layers.1", "model.layers.0"])(tokens)
    assert head.calls == 0  # the forward pass stopped after the last hooked module
    assert torch.equal(acts["model.layers.0"], hidden[1])
    assert torch.equal(acts["model.layers.1"], hidden[2])
    assert torch.equal(ModuleHarvester(model, ["model.norm"])(tokens)["model.norm"], hidden[3])


# ------------------------------------------------ loading TransformerLens models from offline checkpoints
def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(1)
    cfg = GPT2Config(
        n_layer=3, n_embd=32, n_head=4, vocab_size=3 + len(WORDS), n_positions=64, bos_token_id=0,
        eos_token_id=0, n_ctx=64,  # hub GPT-2 configs carry n_ctx; TransformerLens's converter reads it
    )  # fmt: skip
    return GPT2LMHeadModel(cfg).eval()


def save_checkpoint(hf: torch.nn.Module, folder) -> None:
    hf.save_pretrained(folder)
    word_tokenizer(WORDS).save_pretrained(folder)


def check_against_hf(tl, hf, hooks: list[str]) -> None:
    """Raw weights: TL's hook activations and logits equal the HF model's hidden states and logits (up to
    attention-kernel rounding; folding or centring weights would change resid_post and the logits)."""
    assert type(tl).__name__ == "HookedTransformer"
    tokens = torch.randint(3, 3 + len(WORDS), (2, 10), generator=torch.Generator().manual_seed(2))
    tokens[:, 0] = 0  # BOS
    with torch.no_grad():
        out = hf(tokens, output_hidden_states=True)
        _, cache = tl.run_with_cache(tokens)
        torch.testing.assert_close(tl(tokens), out.logits, rtol=1e-4, atol=1e-5)
    acts = make_harvester(tl, "transformer_lens", hooks)(tokens)
    for hook in hooks:
        layer = int(hook.split(".")[1])
        assert torch.equal(acts[hook], cache[hook])
        torch.testing.assert_close(acts[hook], out.hidden_states[layer + 1], rtol=1e-4, atol=1e-5)
    assert tl.to_tokens("w3 w4").tolist() == [[0, 6, 7]]  # TL's tokenizer, BOS prepended


def test_hub_name_loads_through_from_pretrained(tmp_path, monkeypatch):
    """A model in TransformerLens's list ("gpt2") is loaded by `HookedTransformer.from_pretrained_no_processing`
    from the hub; here the hub cache holds a small random GPT-2 under that name, read offline."""
    hf = tiny_gpt2()
    repo = tmp_path / "hub" / "models--gpt2"
    save_checkpoint(hf, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tl, tokenizer = load_model("gpt2", "transformer_lens", CPU, "float32", str(tmp_path))
    assert tl.cfg.model_name == "gpt2" and tl.cfg.original_architecture == "GPT2LMHeadModel"
    assert tokenizer is tl.tokenizer and tl.cfg.n_layers == 3
    check_against_hf(tl, hf, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_local_checkpoint_converts_to_transformer_lens(tmp_path, arch):
    """A local folder TransformerLens's list lacks: Llama configs are translated by saelab (the folder's name
    holds "llama", which TransformerLens's own name-based config lookup trips on), others by TransformerLens."""
    hf = tiny_llama() if arch == "llama" else tiny_gpt2()
    folder = tmp_path / f"tiny-{arch}"
    save_checkpoint(hf, folder)
    tl, _ = load_model(str(folder), "transformer_lens", CPU, "float32", str(tmp_path))
    if arch == "llama":
        assert tl.cfg.n_key_value_heads == 2 and tl.cfg.positional_embedding_type == "rotary"
    check_against_hf(tl, hf, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"])


def test_scaled_rope_is_refused():
    cfg = tiny_llama().config
    cfg.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="'linear' RoPE scaling.*source.backend=hf"):
        llama_config(cfg, "x", CPU, torch.float32)


# ------------------------------------------------------------------ the real SmolLM2-135M, offline
@pytest.fixture(scope="session")
def assets():
    return fetch_or_skip()


@pytest.fixture(scope="session")
def smollm2(assets):
    """(HookedTransformer, plain HF model, tokenizer): two independent loads of the converted checkpoint."""
    tl, tokenizer = load_model("smollm2", "transformer_lens", CPU, "float32", str(assets))
    hf, _ = load_model("smollm2", "hf", CPU, "float32", str(assets))
    return tl, hf, tokenizer


def test_smollm2_harvest_equals_its_own_activations(smollm2):
    tl, hf, tokenizer = smollm2
    text = [
        "It was the best of times, it was the worst of times.",
        "To be, or not to be: that is the question.",
    ]
    tokens = torch.tensor([ids[:12] for ids in tokenizer(text)["input_ids"]])
    assert type(tl).__name__ == "HookedTransformer" and tl.cfg.n_layers == 30 and tl.cfg.d_model == 576
    assert (tokens[:, 0] == tokenizer.bos_token_id).all()  # TransformerLens's tokenizer prepends BOS
    with torch.no_grad():
        logits, cache = tl.run_with_cache(tokens)  # the model's own full run, no filter, no early stop
        out = hf(tokens, output_hidden_states=True)
    hidden = out.hidden_states
    late = CallCounter(tl.blocks[3])
    acts = TransformerLensHarvester(tl, ["blocks.2.hook_resid_post", "blocks.1.hook_mlp_out"])(tokens)
    assert late.calls == 0  # blocks 3..29 were not run
    assert torch.equal(acts["blocks.2.hook_resid_post"], cache["blocks.2.hook_resid_post"])
    assert torch.equal(acts["blocks.1.hook_mlp_out"], cache["blocks.1.hook_mlp_out"])
    # TransformerLens runs eager attention, HF sdpa: equal up to float32 rounding
    torch.testing.assert_close(acts["blocks.2.hook_resid_post"], hidden[3], rtol=1e-4, atol=1e-3)
    assert (logits - out.logits).abs().max() < 1e-3  # raw weights: no LayerNorm folding or centring
    hf_acts = ModuleHarvester(hf, ["model.layers.2"])(tokens)
    assert torch.equal(hf_acts["model.layers.2"], hidden[3])


def test_smollm2_pipeline_drops_special_tokens(smollm2, assets):
    tl, _, tokenizer = smollm2
    cfg = ModelSourceConfig(dataset=str(assets / SHAKESPEARE_GLOB), context_size=16, model_batch_size=3)
    pipeline = HarvestPipeline.from_tokenizer(
        make_harvester(tl, "transformer_lens", ["blocks.0.hook_resid_post"]), tokenizer, cfg
    )
    acts, token_ids, n_ctx = next(harvest_rows(pipeline, batch_size=3))
    tokens = next(pipeline.contexts.batches(3))
    assert n_ctx == 3 and (tokens[:, 0] == tokenizer.bos_token_id).all()
    keep = keep_mask(tokens, torch.tensor(excluded_token_ids(tokenizer)))
    assert not keep[:, 0].any() and keep.sum() >= 3 * 14  # BOS (and any separator) dropped, text kept
    with torch.no_grad():
        _, cache = tl.run_with_cache(tokens, names_filter="blocks.0.hook_resid_post", stop_at_layer=1)
    assert torch.equal(acts["blocks.0.hook_resid_post"], cache["blocks.0.hook_resid_post"][keep])
    assert torch.equal(token_ids, tokens[keep])
    first_play = sorted(assets.glob(SHAKESPEARE_GLOB))[0].read_text()
    assert first_play.startswith(tokenizer.decode(tokens[0, 1:]))  # the first context is the corpus's start


def test_train_on_live_smollm2_end_to_end(assets, tmp_path):
    run = tmp_path / "run"
    main([
        "train", "source=smollm2", f"source.assets_dir={assets}", "source.hook_name=blocks.1.hook_resid_post",
        "source.context_size=32", "source.model_batch_size=4", "source.buffer_tokens=256",
        "sae=topk", "sae.expansion_factor=2", "sae.k=8", "trainer.total_tokens=384", "trainer.batch_size=64",
        "trainer.log_every=2", "trainer.device=cpu", "logging.progress=false", f"hydra.run.dir={run}",
    ])  # fmt: skip
    cfg = json.loads((run / "sae" / "cfg.json").read_text())
    assert cfg["d_in"] == 576 and cfg["d_sae"] == 1152
    meta = cfg["metadata"]
    assert meta["model_name"] == "smollm2" and meta["hook_name"] == "blocks.1.hook_resid_post"
    assert meta["context_size"] == 32 and meta["dataset_path"].endswith("*_gut.txt")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["tokens"] == 384
    assert summary["input_scale"] > 0 and summary["loss"] == summary["loss"]  # finite


def test_harvest_smollm2_then_train_from_the_cache(smollm2, assets, tmp_path, capsys):
    tl, _, tokenizer = smollm2
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    main(
        ["harvest", "--cfg", "job", f"source.assets_dir={assets}", "output_dir=x"]
    )  # configs/harvest.yaml composes
    assert "hook_name: blocks.6.hook_resid_post" in capsys.readouterr().out
    src = ModelSourceConfig(dataset=str(assets / SHAKESPEARE_GLOB), context_size=32, model_batch_size=4)
    cache = tmp_path / "cache"
    cfg = HarvestRunConfig(
        source=src, output_dir=str(cache), hook_names=hooks, total_tokens=400, shard_tokens=128
    )
    pipeline = HarvestPipeline.from_tokenizer(make_harvester(tl, "transformer_lens", hooks), tokenizer, src)
    manifest = run_harvest(cfg, pipeline)
    assert manifest["total_rows"] == 400 and list(manifest["hooks"]) == hooks
    assert "400 tokens per hook" in capsys.readouterr().out  # the summary
    run = tmp_path / "run"
    main([
        "train", "source=cache", f"source.path={cache}", "source.hook_name=blocks.1.hook_resid_post",
        "sae=relu", "sae.expansion_factor=2", "trainer.total_tokens=640", "trainer.batch_size=64",
        "trainer.device=cpu", "logging.progress=false", f"hydra.run.dir={run}",
    ])  # fmt: skip
    meta = json.loads((run / "sae" / "cfg.json").read_text())["metadata"]
    assert meta["source"] == "cache" and meta["model_name"] == "smollm2"
    assert meta["hook_name"] == "blocks.1.hook_resid_post" and meta["context_size"] == 32
    assert json.loads((run / "summary.json").read_text())["steps"] == 10


def test_a_context_longer_than_the_model_takes_and_a_non_text_column_are_named(tmp_path):
    from harvest_helpers import write_corpus

    from saelab.data.tokens import iter_texts

    model, tokenizer = tiny_tl(n_layers=1), word_tokenizer(WORDS)  # n_ctx 64
    corpus = write_corpus(tmp_path / "corpus", n_docs=4)
    too_long = ModelSourceConfig(
        model="tiny", hook_name="blocks.0.hook_resid_post", dataset=str(corpus), context_size=100
    )
    harvester = TransformerLensHarvester(model, ["blocks.0.hook_resid_post"])
    with pytest.raises(
        ValueError, match=r"source\.context_size=100 is longer than the model's context \(64 tokens\)"
    ):
        HarvestPipeline.from_tokenizer(harvester, tokenizer, too_long)
    for value, kind in ((5, "int"), (["w1 w2", "w3"], "list")):
        with pytest.raises(TypeError, match=rf"source\.text_column='text' holds a {kind} .*not text"):
            list(iter_texts([{"text": "fine"}, {"text": value}], "text"))
