"""Settings of the explanations (`explain.*` of `saelab inspect`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from saelab.core.checks import check_number

EXPLAINERS = ("none", "hf", "openai")
SCORERS = ("detection", "fuzzing")


@dataclass
class ExplainConfig:
    """Who explains which latents, from which examples, and how the explanations are scored.

    explainer: "none" (no explanations), "hf" (a local Hugging Face causal LM through transformers: `model` is
    its folder or hub id) or "openai" (an OpenAI-compatible chat-completions endpoint at `base_url`, `model`
    its model name, the key read from the environment variable `api_key_env`; none is sent when it is unset).
    import_file: instead of explaining, import explanations from a JSON file (e.g. a Neuronpedia export).
    latents: the latents to explain (empty: the first `limit` latents that fire, by id; limit 0: all of them).
    overwrite: explain again latents that already have an explanation (else they are skipped).
    n_explain_top: top examples shown to the explainer, with half of each activation interval's sample; the
    other half and the remaining top examples are held out for scoring. n_score: held-out activating examples
    scored per latent (and as many non-activating random windows for detection). scorers: "detection" (does the
    explanation tell activating from non-activating text?) and / or "fuzzing" (does it tell the tokens where
    the latent fires from random ones?); each reports balanced accuracy (0.5: chance).
    examples_per_prompt: examples per scoring prompt. max_new_tokens / temperature: generation.
    concurrency: parallel requests to an HTTP endpoint. timeout_s / retries: per request. seed: the held-out
    split and the scoring's random choices.
    """

    explainer: str = "none"
    model: str = ""
    base_url: str = "https://api.openai.com/v1"
    api_key_env: str = "OPENAI_API_KEY"
    import_file: str | None = None
    latents: list[int] = field(default_factory=list)
    limit: int = 100
    overwrite: bool = False
    n_explain_top: int = 10
    n_score: int = 10
    scorers: list[str] = field(default_factory=lambda: list(SCORERS))
    examples_per_prompt: int = 5
    max_new_tokens: int = 120
    temperature: float = 0.0
    concurrency: int = 4
    timeout_s: float = 120.0
    retries: int = 2
    seed: int = 0

    @property
    def enabled(self) -> bool:
        return self.explainer != "none" or bool(self.import_file)

    def validate(self) -> None:
        """Raise ValueError naming the offending explain field and the fix."""
        if self.explainer not in EXPLAINERS:
            raise ValueError(f"explain.explainer={self.explainer!r} must be one of {', '.join(EXPLAINERS)}.")
        if self.explainer != "none" and not self.model:
            raise ValueError(
                f"explain.explainer={self.explainer} needs explain.model=: a local model folder or hub id (hf), "
                "or the endpoint's model name (openai)."
            )
        if self.explainer == "openai" and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"explain.base_url={self.base_url!r} must be an http(s) URL, e.g. http://localhost:8000/v1."
            )
        unknown = [s for s in self.scorers if s not in SCORERS]
        if unknown:
            raise ValueError(f"explain.scorers has {unknown}; choose among {list(SCORERS)}.")
        for name in ("limit", "n_explain_top", "n_score", "retries"):
            check_number(f"explain.{name}", getattr(self, name), low=0, integer=True)
        for name in ("examples_per_prompt", "max_new_tokens", "concurrency"):
            check_number(f"explain.{name}", getattr(self, name), low=1, integer=True)
        check_number("explain.temperature", self.temperature, low=0)
        check_number("explain.timeout_s", self.timeout_s, low=0, low_open=True)
        check_number("explain.seed", self.seed, integer=True)
        for latent in self.latents:
            check_number("explain.latents[]", latent, low=0, integer=True)
