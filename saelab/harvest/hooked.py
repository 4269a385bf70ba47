"""TransformerLens `HookedTransformer`s with raw numerics: no LayerNorm folding, weight centring or value-bias
folding, so the activation at every hook point is the Hugging Face model's own (up to attention-kernel rounding).

- A name in TransformerLens's official model list (or an alias, e.g. "gpt2"): `from_pretrained_no_processing`,
  TransformerLens's own hub loading (config, weights and tokenizer), the way SAELens loads its models.
- Any other checkpoint (the offline SmolLM2, a local folder, a hub name TransformerLens lacks), already loaded
  with transformers: a Llama-architecture config is translated here and the weights converted with
  TransformerLens's Llama converter; a local folder of another architecture goes through TransformerLens's
  per-architecture converters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

#: Longest context of a converted model: TransformerLens keeps an [n_ctx, n_ctx] causal mask per layer.
MAX_CONTEXT = 2048


def official_name(model: str) -> str | None:
    """TransformerLens's official name for `model` (a hub name or alias), or None if it is not in its list."""
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        return get_official_model_name(model)
    except ValueError:
        return None


def from_hub(model: str, device: torch.device, dtype: torch.dtype) -> Any:
    """`HookedTransformer.from_pretrained_no_processing(model)` in eval mode (TransformerLens downloads it)."""
    from transformer_lens import HookedTransformer

    return HookedTransformer.from_pretrained_no_processing(model, device=device, dtype=dtype).eval()


def rope_theta(hf_config: Any) -> float:
    """The rotary base of a Llama config (transformers 4 `rope_theta` or 5 `rope_parameters`); scaled RoPE
    variants (llama3, yarn, ...) are refused, as the translated config would silently drop the scaling."""
    params = dict(
        getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    )
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise ValueError(
            f"the checkpoint uses {kind!r} RoPE scaling, which saelab does not translate for TransformerLens; "
            "use source.backend=hf (hooks like model.layers.6) or a model in TransformerLens's official list."
        )
    return float(params.get("rope_theta") or getattr(hf_config, "rope_theta", None) or 10000.0)


def llama_config(hf_config: Any, name: str, device: torch.device, dtype: torch.dtype) -> Any:
    """HookedTransformerConfig of a Llama-architecture transformers config (SmolLM2, TinyLlama, ...)."""
    from transformer_lens import HookedTransformerConfig

    c = hf_config
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise ValueError(
            f"{name}: Llama checkpoints with attention or MLP biases are not converted for TransformerLens; "
            "use source.backend=hf."
        )
    d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return HookedTransformerConfig(
        d_model=c.hidden_size, d_head=d_head, n_heads=c.num_attention_heads, d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers, n_ctx=min(c.max_position_embeddings, MAX_CONTEXT), d_vocab=c.vocab_size,
        act_fn=c.hidden_act, eps=c.rms_norm_eps, normalization_type="RMS", final_rms=True, gated_mlp=True,
        positional_embedding_type="rotary", rotary_base=rope_theta(c), rotary_dim=d_head,
        rotary_adjacent_pairs=False, n_key_value_heads=kv_heads if kv_heads != c.num_attention_heads else None,
        original_architecture="LlamaForCausalLM", model_name=Path(name).name or name, device=device,
        dtype=dtype, init_weights=False,
    )  # fmt: skip


def from_hf(hf: Any, tokenizer: Any, name: str, device: torch.device, dtype: torch.dtype) -> Any:
    """A HookedTransformer holding the weights of the transformers causal LM `hf` (loaded from `name`)."""
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading

    arch = type(hf).__name__
    if arch == "LlamaForCausalLM":
        from transformer_lens.pretrained.weight_conversions import convert_llama_weights

        cfg = llama_config(hf.config, name, device, dtype)
        state = convert_llama_weights(hf, cfg)
    elif Path(name).is_dir():
        cfg = loading.get_pretrained_model_config(name, device=device, dtype=dtype)
        state = loading.get_pretrained_state_dict(name, cfg, hf_model=hf, dtype=dtype)
    else:
        raise ValueError(
            f"source.model={name!r} ({arch}) is not in TransformerLens's official model list, and saelab "
            "converts only Llama-architecture hub checkpoints itself; use a local checkpoint folder, a model "
            "from that list, or source.backend=hf (hooks on submodules, e.g. model.layers.6)."
        )
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    load_unprocessed(model, state)
    return model.eval()


def load_unprocessed(model: Any, state: dict[str, torch.Tensor]) -> None:
    """Load converted weights unchanged: what `load_and_process_state_dict` does with every processing flag
    off, in one `load_state_dict` call rather than one per key (SmolLM2 on 2 CPU cores: ~2 s, not ~7 s)."""
    missing, unexpected = model.load_state_dict(model.fill_missing_keys(state), strict=False)
    params = dict(model.named_parameters())
    missing = [key for key in missing if key in params]
    if missing or unexpected:
        raise RuntimeError(
            f"converted weights do not fit the TransformerLens model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}."
        )
