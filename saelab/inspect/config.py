"""Settings of `saelab inspect` (collection sizes, histogram range, site layout) and its Hydra schema."""

from __future__ import annotations

from dataclasses import dataclass

from saelab.core.checks import check_number


@dataclass
class InspectConfig:
    """How much text to read and how much to keep per latent.

    total_tokens: non-special tokens to read (whole model batches, so the count can end a little past it).
    start_context: contexts of the text to skip first; -1 (default): past the text the SAE was trained on
    when its metadata shows it trained on this source (as `saelab eval` does), else 0.
    batch_size: contexts per forward pass. n_top: top-activating examples kept per latent. n_bands / per_band:
    `per_band` examples sampled uniformly from the latent's firings in each of `n_bands` equal-width
    activation intervals below a power of two above its maximum (so 1/2 to all of the intervals are in use).
    n_random: token windows sampled uniformly from the whole text, with the latents firing in them (the
    non-activating examples explanations are scored on). n_cofiring: co-firing partners listed per latent
    (Misra-Gries candidates, then counted exactly). cofiring_cap: only each token's `cofiring_cap` strongest
    latents count as co-firing (exact for TopK SAEs with k <= cap). n_neighbours: nearest latents by decoder
    cosine. n_logit_tokens: promoted / suppressed output tokens. logit_hist_bins: bins of each latent's
    logit-weight histogram. window_before / window_after: tokens shown around each example.
    hist_min / hist_max / hist_bins: the log-spaced activation histogram (values outside fall in the end bins).
    latents_per_file: latents per data file of the site. weights_chunk: latents per chunk of the weight
    analyses. device: "auto" -> cuda when available. seed: the sampling's random keys.
    """

    total_tokens: int = 262_144
    start_context: int = -1
    batch_size: int = 8
    n_top: int = 20
    n_bands: int = 10
    per_band: int = 4
    n_random: int = 256
    n_cofiring: int = 16
    cofiring_cap: int = 32
    n_neighbours: int = 10
    n_logit_tokens: int = 10
    logit_hist_bins: int = 32
    window_before: int = 24
    window_after: int = 8
    hist_min: float = 1e-4
    hist_max: float = 1e4
    hist_bins: int = 64
    latents_per_file: int = 256
    weights_chunk: int = 2048
    device: str = "auto"
    seed: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the offending inspect field and the fix."""
        positive = (
            "total_tokens",
            "batch_size",
            "n_top",
            "n_bands",
            "hist_bins",
            "latents_per_file",
            "cofiring_cap",
            "logit_hist_bins",
            "weights_chunk",
        )
        for name in positive:
            check_number(f"inspect.{name}", getattr(self, name), low=1, integer=True)
        for name in (
            "per_band",
            "n_random",
            "n_cofiring",
            "n_neighbours",
            "n_logit_tokens",
        ):
            check_number(f"inspect.{name}", getattr(self, name), low=0, integer=True)
        check_number("inspect.start_context", self.start_context, low=-1, integer=True)
        for name, high in (("window_before", 128), ("window_after", 127)):  # the site stores offsets in int8
            check_number(f"inspect.{name}", getattr(self, name), low=0, high=high, integer=True)
        check_number("inspect.seed", self.seed, integer=True)
        check_number("inspect.hist_min", self.hist_min, low=0, low_open=True)
        check_number(
            "inspect.hist_max",
            self.hist_max,
            low=self.hist_min,
            low_open=True,
            hint="It must exceed inspect.hist_min.",
        )
