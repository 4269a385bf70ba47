"""The language models that write and score explanations: one method, `complete(messages) -> text`.

- `HFClient`: a local Hugging Face causal LM through transformers (the tokenizer's chat template when it has
  one, else the messages joined as plain text); greedy at temperature 0.
- `OpenAIClient`: any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp's server, ...) over
  HTTP with the standard library: POST <base_url>/chat/completions, the key (if any) from an environment
  variable as a Bearer token, retried on 429 / 5xx / network errors.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Protocol

import torch

from saelab.inspect.explain.config import ExplainConfig

Messages = list[dict[str, str]]


class Client(Protocol):
    name: str
    #: whether requests may run concurrently (an HTTP endpoint) or one at a time (a local model)
    concurrent: bool

    def complete(self, messages: Messages) -> str: ...


class HFClient:
    """A local causal LM: `model` is a folder or hub id (loaded offline if it is a folder)."""

    concurrent = False

    def __init__(self, model: str, max_new_tokens: int = 120, temperature: float = 0.0, device: str = "cpu"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = f"hf:{model}"
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModelForCausalLM.from_pretrained(model).to(device).eval()
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.lock = threading.Lock()

    def prompt_ids(self, messages: Messages) -> torch.Tensor:
        """Token ids [1, P] of the prompt: the chat template with the assistant's turn opened, or the messages'
        contents joined by blank lines."""
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            text = "\n\n".join(m["content"] for m in messages) + "\n\n"
            ids = self.tokenizer(text)["input_ids"]
        return torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)

    @torch.no_grad()
    def complete(self, messages: Messages) -> str:
        ids = self.prompt_ids(messages).to(self.model.device)
        sample = self.temperature > 0
        kwargs: dict[str, Any] = {"do_sample": sample, "max_new_tokens": self.max_new_tokens}
        if sample:
            kwargs["temperature"] = self.temperature
        pad = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id
        )
        with self.lock:
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=pad, **kwargs)
        return self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


class OpenAIClient:
    """POST <base_url>/chat/completions {"model", "messages", "temperature", "max_tokens"}; the reply's
    choices[0].message.content."""

    concurrent = True

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        max_new_tokens: int = 120,
        temperature: float = 0.0,
        timeout_s: float = 120.0,
        retries: int = 2,
    ):
        self.name = f"openai:{model}"
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.key = model, os.environ.get(api_key_env) or None
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.timeout_s, self.retries = timeout_s, retries

    def complete(self, messages: Messages) -> str:
        body = json.dumps(
            {
                "model": self.model,
                "messages": messages,
                "temperature": self.temperature,
                "max_tokens": self.max_new_tokens,
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    reply = json.loads(response.read())
                return str(reply["choices"][0]["message"]["content"] or "")
            except urllib.error.HTTPError as err:
                if err.code != 429 and err.code < 500 or attempt == self.retries:
                    detail = err.read()[:300].decode(errors="replace")
                    raise RuntimeError(f"{self.url} answered HTTP {err.code}: {detail}") from None
            except (urllib.error.URLError, TimeoutError) as err:
                if attempt == self.retries:
                    raise RuntimeError(f"{self.url} could not be reached: {err}") from None
            except (KeyError, IndexError, TypeError, json.JSONDecodeError) as err:
                raise RuntimeError(
                    f"{self.url} did not answer in the chat-completions format: {err!r}"
                ) from None
            time.sleep(min(2.0**attempt, 30.0))
        raise AssertionError("unreachable")


def make_client(cfg: ExplainConfig, device: str = "cpu") -> Client:
    """The explainer `cfg` names (cfg.explainer "hf" or "openai")."""
    if cfg.explainer == "hf":
        return HFClient(cfg.model, cfg.max_new_tokens, cfg.temperature, device)
    if cfg.explainer == "openai":
        return OpenAIClient(
            cfg.base_url,
            cfg.model,
            cfg.api_key_env,
            cfg.max_new_tokens,
            cfg.temperature,
            cfg.timeout_s,
            cfg.retries,
        )
    raise ValueError(f"explain.explainer={cfg.explainer!r} names no language model; use hf or openai.")
