"""Settings of an evaluation run (`saelab eval`, `saelab.eval.evaluate`)."""

from __future__ import annotations

from dataclasses import dataclass

from saelab.core.checks import check_flags


@dataclass
class EvalConfig:
    """How much data to read and which analyses to run.

    total_tokens: activation rows (tokens at the hook) to evaluate, exactly (a model source's last batch of
    contexts is cut at that many non-special positions). batch_size: rows per batch of an
    activation source; lm_batch_size: sequences per forward pass of a language-model source.
    start_batch: first source batch; -1 (default): past the SAE's training data when its metadata shows it
    trained on this source (synthetic, cache or model), else 0 (pick one past the training data to evaluate
    held out).
    dead_window_tokens: a latent is dead when silent for this many of the last tokens (0: all evaluated tokens).
    cosine_threshold: decoder pairs at or above this cosine are reported as duplicates.
    spectrum_first_rank / spectrum_last_rank: ranks of the power-law fit to the spectrum of cov(W_dec).
    cooccurrence_latents: latents tracked for the co-occurrence analysis (0 disables it).
    """

    total_tokens: int = 262_144
    batch_size: int = 4096
    lm_batch_size: int = 8
    start_batch: int = -1
    dead_window_tokens: int = 0
    cosine_threshold: float = 0.9
    cosine_chunk: int = 4096
    spectrum_first_rank: int = 10
    spectrum_last_rank: int = 150
    cooccurrence_latents: int = 2048
    n_clusters: int = 32
    min_fires: int = 5
    n_shuffles: int = 10
    recovery_threshold: float = 0.9
    plots: bool = True
    device: str = "auto"
    seed: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the offending eval field."""
        check_flags(self, "eval")
        for name in ("total_tokens", "batch_size", "lm_batch_size", "cosine_chunk", "n_shuffles"):
            if getattr(self, name) <= 0:
                raise ValueError(f"eval.{name}={getattr(self, name)} must be > 0.")
        for name in ("dead_window_tokens", "cooccurrence_latents", "min_fires"):
            if getattr(self, name) < 0:
                raise ValueError(f"eval.{name}={getattr(self, name)} must be >= 0.")
        if self.start_batch < -1:
            raise ValueError(
                f"eval.start_batch={self.start_batch} must be >= 0, or -1 (past the training data)."
            )
        if not -1 <= self.cosine_threshold <= 1:
            raise ValueError(f"eval.cosine_threshold={self.cosine_threshold} must be in [-1, 1].")
        if not 1 <= self.spectrum_first_rank < self.spectrum_last_rank:
            raise ValueError("eval.spectrum_first_rank must be >= 1 and < eval.spectrum_last_rank.")
        if self.n_clusters < 2:
            raise ValueError(f"eval.n_clusters={self.n_clusters} must be >= 2.")
        if not 0 < self.recovery_threshold <= 1:
            raise ValueError(f"eval.recovery_threshold={self.recovery_threshold} must be in (0, 1].")
