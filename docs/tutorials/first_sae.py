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
# # Your first SAE on a real model
#
# This tutorial trains a sparse autoencoder on SmolLM2-135M's residual stream, offline, in four commands:
# **harvest** activations to a cache, **train** an SAE from it, **evaluate** it with the SAE spliced into the
# model, and **inspect** what its latents fire on. Each command is the one you would type in a shell; here
# `run` calls it for you and shows its last lines.
#
# The token counts are tiny so that the whole tutorial runs in about a minute on two CPU cores (CI runs it
# with `tests/test_tutorials.py`). The resulting SAE is a smoke test, not a useful dictionary: the last
# section gives the settings of a real run.
#
# It needs the offline assets: `saelab fetch-assets` (which `scripts/setup.sh` runs) puts SmolLM2 and the
# Shakespeare corpus under `./assets`. Run it from the repository's root (or any folder holding `assets/`).

# %%
import json
import os
import re
import shlex
import subprocess
import time
from pathlib import Path

# everything this tutorial writes, in a new folder each time (outputs/ is git-ignored)
WORK = Path("outputs/tutorials") / time.strftime("first_sae-%Y%m%d-%H%M%S")
assert Path("assets/smollm2/hf").is_dir(), "run `saelab fetch-assets` first"


def run(command: str, tail: int = 6) -> None:
    """Run a saelab command as a shell would and print the last `tail` lines it printed (progress bars and
    colours aside); if it fails, raise with its error output."""
    done = subprocess.run(
        shlex.split(command), capture_output=True, text=True, env={**os.environ, "NO_COLOR": "1"}
    )
    if done.returncode:
        raise RuntimeError(f"`{command}` failed with exit code {done.returncode}:\n{done.stderr[-3000:]}")
    lines = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout).strip().splitlines()
    print("\n".join(lines[-tail:]))


# %% [markdown]
# ## 1. Harvest
#
# `source=smollm2` is SmolLM2-135M-Instruct over Shakespeare's plays, in contexts of 128 tokens. We read the
# model with plain `transformers` and forward hooks (`source.backend=hf`, quicker to load than
# TransformerLens) at the output of block 6 of 30, `model.layers.6` (width d_in = 576). BOS and other
# special tokens are dropped, and the model stops after the deepest hook. 2,048 tokens take 4.7 MB in
# float32 (576 x 4 bytes per token, plus its token id).

# %%
HOOK = "model.layers.6"
SOURCE = f"source=smollm2 source.backend=hf source.hook_name={HOOK}"
run(f"saelab harvest {SOURCE} hook_names=[{HOOK}] output_dir={WORK}/cache total_tokens=2048 progress=false")
print(sorted(p.name for p in (WORK / "cache").iterdir()))

# %% [markdown]
# ## 2. Train
#
# `source=cache` reads the harvested rows, shuffled, once (`trainer.total_tokens=0`, the default, is one
# pass over a cache). A TopK SAE keeps the k largest latents of each row; 4x expansion gives 2,304 latents.
# The learning rate is the default, scaled to d_in, width, k and batch (configure.md).

# %%
RUN = WORK / "run"
run(
    f"saelab train source=cache source.path={WORK}/cache sae=topk sae.k=16 sae.expansion_factor=4 "
    f"trainer.batch_size=128 logging.progress=false hydra.run.dir={RUN}"
)
summary = json.loads((RUN / "summary.json").read_text())
print({key: summary[key] for key in ("steps", "tokens", "fvu", "l0", "dead_frac")})
print(sorted(p.name for p in (RUN / "sae").iterdir()))  # SAELens's layout: SAELens loads it as it is

# %% [markdown]
# `fvu` is the fraction of the activations' variance the SAE fails to reconstruct (0 is perfect), `l0` the
# mean number of active latents per token (k), `dead_frac` the fraction of latents that did not fire over
# the last `dead_window_tokens`.
#
# ## 3. Evaluate
#
# `saelab eval` runs the model over text with the SAE spliced in at its hook and compares the next-token
# loss with the clean model's and with the hook zero-ablated. The harvest read about the first 16 contexts of the
# corpus, so `eval.start_batch=8` (8 batches of 8 contexts) starts on text the SAE never saw.

# %%
run(
    f"saelab eval sae={RUN} {SOURCE} eval.total_tokens=256 eval.start_batch=8 output_dir={WORK}/eval",
    tail=16,
)
report = json.loads((WORK / "eval" / "report.json").read_text())
lm = report["lm"]
print(
    f"CE clean {lm['ce_clean']:.3f}, with the SAE {lm['ce_sae']:.3f}, zero-ablated {lm['ce_zero']:.3f} nats"
)
print(f"CE loss recovered: {lm['ce_loss_score']:.3f}; held out: {report['data']['held_out']}")
assert lm["ce_clean"] < lm["ce_sae"] < lm["ce_zero"]

# %% [markdown]
# `ce_loss_score` = (CE_zero - CE_sae) / (CE_zero - CE_clean): 1 when the SAE's reconstruction costs the
# model nothing, 0 when it is as bad as deleting the activation. `report.html` in the same folder shows every
# figure with its random baselines (evaluation.md says how to read them).
#
# ## 4. Inspect
#
# `saelab inspect` runs the model and the SAE over more text and writes a feature browser: a static site
# that opens from disk (`file://.../index.html`). For each latent: its firing density, top contexts,
# activation and logit histograms, nearest and co-firing latents.

# %%
run(
    f"saelab inspect sae={RUN} {SOURCE} inspect.total_tokens=512 inspect.start_context=64 "
    f"output_dir={WORK}/inspect",
    tail=3,
)
site = WORK / "inspect"
print((site / "index.html").resolve().as_uri())
assert (site / "index.html").is_file()

# %% [markdown]
# ## A real run
#
# The same four steps at a useful scale (times on a 2-core CPU; a GPU is far faster, and a cache makes every
# further SAE cheap):
#
# ```bash
# saelab harvest source=smollm2 output_dir=caches/smol hook_names='[blocks.6.hook_resid_post]' total_tokens=2000000
# saelab train -m source=cache source.path=caches/smol sae.k=16,32,64      # a sweep over k, one pass each
# saelab eval sae=multirun/<date>/<time> source=smollm2 eval.suite=[core,absorption,sparse_probing]
# saelab inspect sae=multirun/<date>/<time>/<a job's folder> source=smollm2 inspect.total_tokens=1000000
# ```
#
# The harvest writes 4.6 GB (2M tokens x 576 float32 values). Next: [the pretrained-SAE
# tutorial](pretrained_sae.md), [sources and harvesting](../sources.md), [evaluation](../evaluation.md).
