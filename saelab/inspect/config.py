"""Settings of `saelab inspect` (collection sizes, histogram range, site layout) and its Hydra schema."""

from __future__ import annotations

from dataclasses import dataclass

from saelab.core.checks import check_number


@dataclass
class InspectConfig:
    """How much text to read and how much to keep per latent.

    total_tokens: non-special tokens to read (whole model batches, so the count can end a little past it).
    batch_size: contexts per forward pass. n_top: top-activating examples kept per latent. n_samples: examples
    kept per latent by uniform reservoir sampling over all its firings (shown grouped by activation quantile).
    n_cofiring: co-firing partners tracked per latent (a Misra-Gries table; counts are lower bounds with a
    recorded error bound). cofiring_cap: only each token's `cofiring_cap` strongest latents count as co-firing
    (exact for TopK SAEs with k <= cap). n_neighbours: nearest latents by decoder cosine. n_logit_tokens:
    promoted / suppressed output tokens. window_before / window_after: tokens shown around each example.
    hist_min / hist_max / hist_bins: the log-spaced activation histogram (values outside fall in the end bins).
    latents_per_file: latents per data file of the site. device: "auto" -> cuda when available.
    seed: the reservoir sampling's random keys.
    """

    total_tokens: int = 262_144
    batch_size: int = 8
    n_top: int = 20
    n_samples: int = 24
    n_cofiring: int = 16
    cofiring_cap: int = 32
    n_neighbours: int = 10
    n_logit_tokens: int = 10
    window_before: int = 24
    window_after: int = 8
    hist_min: float = 1e-4
    hist_max: float = 1e4
    hist_bins: int = 64
    latents_per_file: int = 256
    device: str = "auto"
    seed: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the offending inspect field and the fix."""
        for name in ("total_tokens", "batch_size", "n_top", "hist_bins", "latents_per_file", "cofiring_cap"):
            check_number(f"inspect.{name}", getattr(self, name), low=1, integer=True)
        for name in (
            "n_samples",
            "n_cofiring",
            "n_neighbours",
            "n_logit_tokens",
            "window_before",
            "window_after",
        ):
            check_number(f"inspect.{name}", getattr(self, name), low=0, integer=True)
        check_number("inspect.seed", self.seed, integer=True)
        check_number("inspect.hist_min", self.hist_min, low=0, low_open=True)
        check_number(
            "inspect.hist_max",
            self.hist_max,
            low=self.hist_min,
            low_open=True,
            hint="It must exceed inspect.hist_min.",
        )
