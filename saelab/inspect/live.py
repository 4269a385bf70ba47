"""The served browser's text box: run the model and the SAE on typed text.

    live = LiveModel(model, sae, "blocks.6.hook_resid_post", tokenizer)
    live.run("The cat sat on the mat.", latent=12)

For every token: the latents that fire there (strongest first). For a chosen latent: its activation on every
token, and its effect on the next-token predictions: the model is run again with the latent's contribution
(activation x decoder row) subtracted from the activation at the hook wherever it fires, and each position
reports the change in the loss of the actual next token (ablated minus clean: positive when the latent helped
predict it) and, where the latent fires, the output tokens whose log-probability fell / rose most.
Special tokens (BOS, ...) are not encoded (their codes count as zero), as in collection.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from saelab.eval.lm import logits_of
from saelab.inspect.tokens import token_texts
from saelab.sae.base import SAE
from saelab.splice.features import tokenize
from saelab.splice.hooks import edited


class LiveModel:
    """A model with an SAE at `hook_name`, run on one text at a time (thread-safe: one run at once).

    excluded_ids: special token ids whose codes are zeroed (default: the tokenizer's). prepend_bos: BOS in
    front of the text as in the collected contexts. max_tokens: longer texts are cut (and say so).
    """

    def __init__(
        self,
        model: nn.Module,
        sae: SAE,
        hook_name: str,
        tokenizer: Any,
        excluded_ids: Sequence[int] = (),
        prepend_bos: bool = True,
        max_tokens: int = 512,
        n_per_token: int = 8,
        n_effect_tokens: int = 5,
    ):
        self.model, self.sae, self.hook_name, self.tokenizer = model, sae, hook_name, tokenizer
        self.excluded = torch.as_tensor(list(excluded_ids), dtype=torch.long)
        self.prepend_bos, self.max_tokens = prepend_bos, max_tokens
        self.n_per_token, self.n_effect_tokens = n_per_token, n_effect_tokens
        self.device = next(model.parameters()).device
        self.lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        return {
            "live": True,
            "d_sae": self.sae.d_sae,
            "hook_name": self.hook_name,
            "max_tokens": self.max_tokens,
        }

    def _forward(self, tokens: Tensor, edit=None) -> tuple[Tensor, Tensor]:
        """(logits [T, V] float32, the activation at the hook [T, d]) of one context tokens [1, T]; `edit`
        changes the activation the rest of the model sees."""
        seen: list[Tensor] = []

        def record(act: Tensor) -> Tensor:
            seen.append(act.detach())
            return edit(act) if edit is not None else act

        with edited(self.model, self.hook_name, record):
            logits = logits_of(self.model(tokens.to(self.device)))
        return logits[0].float(), seen[0][0]

    @torch.no_grad()
    def run(self, text: str, latent: int | None = None) -> dict[str, Any]:
        """The page's JSON for `text` (module docstring); `latent` None: only the firing latents."""
        if latent is not None and not 0 <= latent < self.sae.d_sae:
            raise ValueError(f"latent {latent} does not exist: this SAE has latents 0-{self.sae.d_sae - 1}.")
        with self.lock:
            return self._run(text, latent)

    def _run(self, text: str, latent: int | None) -> dict[str, Any]:
        ids = tokenize(self.model, [text], self.tokenizer, self.prepend_bos)[0]
        cut = ids.numel() > self.max_tokens
        ids = ids[: self.max_tokens]
        tokens = ids[None]
        logits, x = self._forward(tokens)
        special = torch.isin(ids, self.excluded)
        codes = self.sae.encode(x.to(self.sae.W_dec.device, self.sae.W_dec.dtype)).float()
        codes[special.to(codes.device)] = 0
        k = min(self.n_per_token, self.sae.d_sae)
        best = codes.topk(k, dim=1)
        per_token = [
            [[int(i), round(float(v), 4)] for i, v in zip(row_i, row_v, strict=True) if v > 0]
            for row_i, row_v in zip(best.indices.tolist(), best.values.tolist(), strict=True)
        ]
        out: dict[str, Any] = {
            "ids": ids.tolist(),
            "special": special.tolist(),
            "cut": cut,
            "top": per_token,
            "latent": latent,
        }
        shown = set(ids.tolist())
        if latent is not None:
            out.update(self._effect(tokens, logits, codes[:, latent], latent, shown))
        texts = token_texts(self.tokenizer, sorted(shown)) if self.tokenizer is not None else {}
        out["texts"] = {str(i): texts.get(i, f"<{i}>") for i in sorted(shown)}
        return out

    def _effect(self, tokens: Tensor, logits: Tensor, acts: Tensor, latent: int, shown: set[int]) -> dict:
        """The chosen latent's activations and the effect of removing it (module docstring)."""
        direction = self.sae.W_dec[latent].detach()

        def remove(act: Tensor) -> Tensor:
            delta = acts.to(act.device, act.dtype)[:, None] * direction.to(act.device, act.dtype)
            return act - delta[None]

        ablated, _ = self._forward(tokens, remove)
        log_p, log_q = logits.log_softmax(-1), ablated.log_softmax(-1)
        target = tokens[0, 1:].to(log_p.device)
        loss = -log_p[:-1].gather(1, target[:, None]).squeeze(1)
        dloss = -log_q[:-1].gather(1, target[:, None]).squeeze(1) - loss
        effects = []
        for pos in (acts > 0).nonzero().flatten().tolist():
            change = log_p[pos] - log_q[pos]  # > 0: the latent raised this token's log-probability
            up, down = change.topk(self.n_effect_tokens), change.topk(self.n_effect_tokens, largest=False)
            shown.update(up.indices.tolist() + down.indices.tolist())
            effects.append(
                [
                    pos,
                    [[int(t), round(float(v), 4)] for t, v in zip(up.indices, up.values, strict=True)],
                    [[int(t), round(float(v), 4)] for t, v in zip(down.indices, down.values, strict=True)],
                ]
            )
        return {
            "acts": [round(float(a), 4) for a in acts.tolist()],
            "loss": [round(float(v), 4) for v in loss.tolist()],
            "dloss": [round(float(v), 4) for v in dloss.tolist()],
            "effects": effects,
        }
