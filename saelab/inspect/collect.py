"""Stream token contexts through a model with an SAE at its hook and keep, per latent, bounded summaries:

firing count, sum and max of activations, a log-spaced activation histogram, the top-N activating tokens,
uniform samples of its firings within equal-width activation intervals (`saelab.inspect.tables.BandTable`),
its most co-firing latents (Misra-Gries candidates, then counted exactly from a spill file), each kept
example's activation window, and a uniform sample of token windows with the latents firing in them (the
non-activating examples explanations are scored on); then from the weights its nearest latents by decoder
cosine and the output tokens it promotes / suppresses (`saelab.inspect.weights`).

    data = collect_features(model, sae, contexts, hook_name="blocks.6.hook_resid_post", cfg=InspectConfig())

Memory is fixed per latent (n * (n_top + n_bands * per_band) * window float16, ...) plus the contexts that
kept examples refer to; the tokens' co-firing latent ids go to a temporary file (tokens * cofiring_cap * 2
bytes). Special tokens (BOS, pad, separators: the tokenizer's special ids) are excluded from every statistic,
as in `saelab eval` and `saelab harvest`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn
from tqdm.auto import tqdm

from saelab.core.seeds import generator
from saelab.data.tokens import excluded_token_ids, keep_mask
from saelab.harvest.module import ModuleHarvester
from saelab.harvest.tlens import TransformerLensHarvester
from saelab.inspect.config import InspectConfig
from saelab.inspect.data import FeatureData
from saelab.inspect.tables import (
    BandTable,
    CofiringSpill,
    CofiringTable,
    RandomWindows,
    TopTable,
    best_per_group,
)
from saelab.inspect.tokens import token_texts
from saelab.inspect.weights import WeightAnalyses, weight_analyses
from saelab.metrics.codes import Codes, encode_codes
from saelab.sae.base import SAE
from saelab.splice.hooks import is_transformer_lens

#: Example windows looked up per chunk (bounds the [chunk, window, k] gather of sparse codes).
LOOKUP_CHUNK = 4096
#: Sparse codes of a batch are expanded to dense [N, n] for window lookups up to this many elements.
DENSE_LOOKUP_ELEMENTS = 2**26


class BatchCodes:
    """Codes of one model batch flattened over (context, position): dense [N, n] or sparse (values, indices)
    [N, k]; `keep` [N] bool marks the non-special positions."""

    def __init__(self, codes: Codes, keep: Tensor, context_size: int, d_sae: int):
        self.codes, self.keep, self.context_size, self.d_sae = codes, keep, context_size, d_sae
        self._dense: Tensor | None = None

    def events(self) -> tuple[Tensor, Tensor, Tensor]:
        """(row, latent, value) [E] of every nonzero code at a kept position, sorted by row."""
        if isinstance(self.codes, tuple):
            values, indices = self.codes
            row, slot = ((values != 0) & self.keep[:, None]).nonzero(as_tuple=True)
            return row, indices[row, slot], values[row, slot]
        row, latent = ((self.codes != 0) & self.keep[:, None]).nonzero(as_tuple=True)
        return row, latent, self.codes[row, latent]

    def lookup(self, latent: Tensor, rows: Tensor) -> Tensor:
        """latent [M], rows [M, W] -> [M, W] code of `latent` at each row (0 at special positions)."""
        dense = self.codes if not isinstance(self.codes, tuple) else self._dense_codes()
        if dense is not None:
            found = dense[rows, latent[:, None]]
        else:
            values, indices = self.codes
            found = (values[rows] * (indices[rows] == latent[:, None, None])).sum(dim=-1)
        return found * self.keep[rows]

    def _dense_codes(self) -> Tensor | None:
        """Sparse codes as dense [N, n] (built once per batch), or None when that would be too large."""
        values, indices = self.codes
        if self._dense is None and values.shape[0] * self.d_sae <= DENSE_LOOKUP_ELEMENTS:
            dense = torch.zeros(values.shape[0], self.d_sae, dtype=values.dtype, device=values.device)
            self._dense = dense.scatter_add_(1, indices, values)
        return self._dense

    def window_bounds(self, row: Tensor, before: int, after: int) -> tuple[Tensor, Tensor]:
        """row [M] -> (first, stop) [M]: the rows of each row's window, cut at its context's ends."""
        ctx_start = row - row % self.context_size
        first = torch.maximum(row - before, ctx_start)
        stop = torch.minimum(row + after + 1, ctx_start + self.context_size)
        return first, stop

    def windows(self, latent: Tensor, row: Tensor, before: int, after: int) -> Tensor:
        """latent, row [M] -> [M, before + 1 + after]: the latent's codes around each row within its context,
        NaN past the context's ends."""
        offsets = torch.arange(-before, after + 1, device=row.device)
        pos = (row % self.context_size)[:, None] + offsets
        inside = (pos >= 0) & (pos < self.context_size)
        rows = (row[:, None] + offsets).clamp(0, self.keep.numel() - 1)
        out = torch.cat(
            [
                self.lookup(latent[i : i + LOOKUP_CHUNK], rows[i : i + LOOKUP_CHUNK])
                for i in range(0, latent.numel(), LOOKUP_CHUNK)
            ]
        )
        return out.float().masked_fill(~inside, torch.nan)


def strongest_per_row(row: Tensor, latent: Tensor, value: Tensor, n_rows: int, cap: int) -> Tensor:
    """Events -> [n_rows, c] each row's firing latents with the `cap` largest |value| (c <= cap), -1 padded."""
    order, rank = best_per_group(row, value.abs(), cap)
    width = int(rank.max()) + 1 if rank.numel() else 0
    active = torch.full((n_rows, width), -1, dtype=torch.long, device=row.device)
    active[row[order], rank] = latent[order]
    return active


def latents_in_windows(event_row: Tensor, event_latent: Tensor, first: Tensor, stop: Tensor) -> list[Tensor]:
    """Events sorted by row; first, stop [M] row ranges -> per range, the distinct latents firing in it."""
    lo = torch.searchsorted(event_row, first).tolist()
    hi = torch.searchsorted(event_row, stop).tolist()
    return [torch.unique(event_latent[a:b]) for a, b in zip(lo, hi, strict=True)]


class ContextStore:
    """Token ids of the contexts that kept examples refer to: ids [C] int64 ascending, tokens [C, T] int32."""

    def __init__(self, context_size: int):
        self.ids = torch.zeros(0, dtype=torch.long)
        self.tokens = torch.zeros(0, context_size, dtype=torch.int32)

    def add(self, first_id: int, tokens: Tensor, wanted: Tensor) -> None:
        """Store the contexts `wanted` (ids in [first_id, first_id + B)) of a batch tokens [B, T]."""
        wanted = wanted.cpu()
        self.ids = torch.cat([self.ids, wanted])
        self.tokens = torch.cat([self.tokens, tokens[wanted - first_id].to(torch.int32)])

    def keep_only(self, live: Tensor) -> None:
        keep = torch.isin(self.ids, live.cpu())
        self.ids, self.tokens = self.ids[keep], self.tokens[keep]

    def nbytes(self) -> int:
        return self.ids.numel() * 8 + self.tokens.numel() * 4


class LatentCollector:
    """The streaming state of `collect_features`; `update` once per model batch, then `finish`."""

    def __init__(self, d_sae: int, context_size: int, cfg: InspectConfig, device: torch.device):
        self.n, self.context_size, self.cfg = d_sae, context_size, cfg
        width = cfg.window_before + 1 + cfg.window_after
        self.fire_count = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.act_sum = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.act_max = torch.full((d_sae,), -torch.inf, device=device)
        self.hist_counts = torch.zeros(d_sae, cfg.hist_bins, dtype=torch.long, device=device)
        self.hist_edges = torch.logspace(
            torch.log10(torch.tensor(cfg.hist_min)).item(),
            torch.log10(torch.tensor(cfg.hist_max)).item(),
            cfg.hist_bins + 1,
            dtype=torch.float64,
        )
        self.top = TopTable(d_sae, cfg.n_top, width, device)
        self.bands = BandTable(d_sae, cfg.n_bands, cfg.per_band, width, device)
        self.random = RandomWindows(cfg.n_random, device)
        self.cofiring = CofiringTable(d_sae, cfg.n_cofiring, device)
        self.spill = CofiringSpill(d_sae) if cfg.n_cofiring > 0 else None
        self.store = ContextStore(context_size)
        self.generator = generator(cfg.seed, "inspect.sampling", device=device)
        self.n_tokens = self.n_contexts = 0
        self._live = 0

    def histogram_bin(self, value: Tensor) -> Tensor:
        """Activation magnitudes [E] -> bin index [E] of the log-spaced histogram (ends absorb outliers)."""
        lo, hi = self.hist_edges[0].item(), self.hist_edges[-1].item()
        bins = self.cfg.hist_bins
        pos = (value.abs().double().log10() - torch.log10(torch.tensor(lo))) / (
            torch.log10(torch.tensor(hi / lo)) / bins
        )
        return pos.floor().clamp(0, bins - 1).long()

    @torch.no_grad()
    def update(self, codes: Codes, tokens: Tensor, keep: Tensor) -> None:
        """codes of the flattened batch [B * T, ...], tokens [B, T] int, keep [B, T] bool (non-special)."""
        T, cfg = self.context_size, self.cfg
        if tokens.shape[1] != T:
            raise ValueError(f"every token batch must hold contexts of {T} tokens, got {tokens.shape[1]}.")
        device = self.fire_count.device
        batch = BatchCodes(codes, keep.reshape(-1).to(device), T, self.n)
        row, latent, value = batch.events()
        value = value.float()
        base = self.n_contexts * T
        self.fire_count.index_add_(0, latent, torch.ones_like(latent))
        self.act_sum.index_add_(0, latent, value.double())
        self.act_max.scatter_reduce_(0, latent, value, "amax")
        flat_hist = self.hist_counts.view(-1)
        flat_hist.index_add_(0, latent * cfg.hist_bins + self.histogram_bin(value), torch.ones_like(latent))

        def windows(event: Tensor) -> Tensor:
            return batch.windows(latent[event], row[event], cfg.window_before, cfg.window_after)

        token = row + base
        changed = self.top.token[self.top.update(latent, value, value, token, windows)]
        keys = torch.rand(latent.numel(), generator=self.generator, device=device)
        band_rows = self.bands.update(latent, keys, value, token, windows)
        kept_rows = batch.keep.nonzero().flatten()

        def window_latents(candidate: Tensor) -> list[Tensor]:
            first, stop = batch.window_bounds(kept_rows[candidate], cfg.window_before, cfg.window_after)
            return latents_in_windows(row, latent, first, stop)

        random_keys = torch.rand(kept_rows.numel(), generator=self.generator, device=device)
        self.random.update(random_keys, kept_rows + base, window_latents)
        active = strongest_per_row(row, latent, value, keep.numel(), cfg.cofiring_cap)
        self.cofiring.update(active)
        if self.spill is not None:
            self.spill.append(active)
        refs = torch.cat(
            [changed.reshape(-1), self.bands.table.token[band_rows].reshape(-1), self.random.token]
        )
        self._store_contexts(tokens, base, refs)
        self.n_contexts += tokens.shape[0]
        self.n_tokens += int(keep.sum())

    def _store_contexts(self, tokens: Tensor, base: int, refs: Tensor) -> None:
        """Keep this batch's contexts that new examples refer to; drop unreferenced ones now and then."""
        new = torch.unique(refs[refs >= base] // self.context_size)
        self.store.add(self.n_contexts, tokens, new)
        if self.store.ids.numel() > 2 * self._live + 4 * tokens.shape[0]:
            live = torch.unique(self.referenced_tokens() // self.context_size)
            self.store.keep_only(live)
            self._live = live.numel()

    def referenced_tokens(self) -> Tensor:
        tables = (self.top.token, self.bands.table.token, self.random.token)
        tokens = torch.cat([t.reshape(-1) for t in tables])
        return tokens[tokens >= 0]

    def state_nbytes(self) -> int:
        """Bytes held in memory by the streaming state (the fixed-size tables plus the stored contexts)."""
        fixed = sum(
            t.numel() * t.element_size()
            for t in (self.fire_count, self.act_sum, self.act_max, self.hist_counts)
        )
        tables = self.top.nbytes() + self.bands.nbytes() + self.random.nbytes() + self.cofiring.nbytes()
        return fixed + tables + self.store.nbytes()

    def exact_cofiring(self) -> tuple[Tensor, Tensor, Tensor]:
        """(partner ids [n, m] by Jaccard descending, exact co-firing counts [n, m], Jaccard [n, m], -1 for an
        empty slot) of the Misra-Gries candidates; the Jaccard index uses the spill's capped firing counts."""
        partner = self.cofiring.partner.cpu()
        if self.spill is None:
            empty = torch.zeros(self.n, 0)
            return partner, empty.long(), empty
        counts = self.spill.exact_counts(partner, self.fire_count.device)
        fires = self.spill.fire_count
        union = fires[:, None] + fires[partner.clamp_min(0)] - counts
        jaccard = torch.where(partner >= 0, counts.double() / union.clamp_min(1).double(), -1.0)
        order = jaccard.argsort(dim=1, descending=True, stable=True)
        self.spill.close()
        return partner.gather(1, order), counts.gather(1, order), jaccard.gather(1, order).float()

    def finish(self, sae: SAE, model: nn.Module, tokenizer: Any, hook_name: str) -> FeatureData:
        """Add the exact co-firing counts and the weight analyses; return everything on the CPU."""
        cfg = self.cfg
        self.store.keep_only(torch.unique(self.referenced_tokens() // self.context_size))
        weights: WeightAnalyses = weight_analyses(sae, model, cfg)
        partner, counts, jaccard = self.exact_cofiring()
        act_max = torch.where(self.fire_count > 0, self.act_max, torch.zeros_like(self.act_max))
        bands = self.bands
        width = cfg.window_before + 1 + cfg.window_after
        band_shape = (self.n, cfg.n_bands, cfg.per_band)
        cpu = lambda t: t.cpu()  # noqa: E731
        data = FeatureData(
            d_sae=self.n,
            hook_name=hook_name,
            context_size=self.context_size,
            window_before=cfg.window_before,
            window_after=cfg.window_after,
            n_tokens=self.n_tokens,
            n_contexts=self.n_contexts,
            fire_count=cpu(self.fire_count),
            act_sum=cpu(self.act_sum),
            act_max=cpu(act_max),
            hist_edges=self.hist_edges,
            hist_counts=cpu(self.hist_counts),
            top_value=cpu(self.top.value),
            top_token=cpu(self.top.token),
            top_window=cpu(self.top.ranked_window()),
            band_scale=cpu(bands.scale),
            band_count=cpu(bands.count),
            band_value=cpu(bands.table.value).reshape(band_shape),
            band_token=cpu(bands.table.token).reshape(band_shape),
            band_window=cpu(bands.table.ranked_window()).reshape(*band_shape, width),
            random_token=cpu(self.random.token),
            random_latents=self.random.latents,
            cofiring_ids=partner,
            cofiring_counts=counts,
            cofiring_jaccard=jaccard,
            cofiring_fires=self.spill.fire_count if self.spill is not None else torch.zeros(self.n).long(),
            cofiring_error=cpu(self.cofiring.error),
            cofiring_cap=cfg.cofiring_cap,
            nearest_ids=weights.nearest_ids,
            nearest_cos=weights.nearest_cos,
            promoted_ids=weights.promoted_ids,
            promoted_logits=weights.promoted_logits,
            suppressed_ids=weights.suppressed_ids,
            suppressed_logits=weights.suppressed_logits,
            logit_hist_range=weights.logit_hist_range,
            logit_hist_counts=weights.logit_hist_counts,
            logit_note=weights.note,
            context_ids=self.store.ids,
            context_tokens=self.store.tokens.long(),
        )
        data.vocab = token_texts(tokenizer, used_token_ids(data))
        return data


def used_token_ids(data: FeatureData) -> list[int]:
    """Every token id the site shows: stored contexts and promoted / suppressed tokens."""
    parts = [data.context_tokens.reshape(-1)]
    parts += [t.reshape(-1) for t in (data.promoted_ids, data.suppressed_ids) if t is not None]
    return torch.unique(torch.cat(parts)).tolist()


def token_batches(contexts: Tensor | Iterable[Tensor], batch_size: int) -> Iterator[Tensor]:
    """A tensor [N, T] split into batches of `batch_size` contexts, or an iterable of [B, T] batches as is."""
    if isinstance(contexts, Tensor):
        if contexts.ndim != 2:
            raise ValueError(
                f"contexts must be token ids [n_contexts, context_size], got {tuple(contexts.shape)}."
            )
        yield from contexts.split(batch_size)
        return
    yield from contexts


def make_hook_harvester(model: nn.Module, hook_name: str) -> TransformerLensHarvester | ModuleHarvester:
    if is_transformer_lens(model):
        return TransformerLensHarvester(model, [hook_name])
    return ModuleHarvester(model, [hook_name])


@torch.no_grad()
def collect_features(
    model: nn.Module,
    sae: SAE,
    contexts: Tensor | Iterable[Tensor],
    *,
    hook_name: str | None = None,
    tokenizer: Any = None,
    excluded_ids: Sequence[int] | Tensor | None = None,
    cfg: InspectConfig | None = None,
    progress: bool = False,
) -> FeatureData:
    """Run `model` over `contexts` (token ids [N, T], or an iterable of [B, T] batches) up to `hook_name`
    (default: the SAE's metadata hook_name), encode with `sae` and collect per-latent summaries until
    cfg.total_tokens non-special tokens have been read. The model may be a TransformerLens model (hook point
    names) or any nn.Module (submodule names, e.g. "model.layers.6"). excluded_ids: token ids left out of
    every statistic (default: the tokenizer's special ids; tokenizer defaults to `model.tokenizer`).
    """
    cfg = cfg or InspectConfig()
    cfg.validate()
    hook_name = hook_name or sae.cfg.metadata.get("hook_name")
    if not hook_name:
        raise ValueError("the SAE's metadata has no hook_name; pass hook_name= (the hook it was trained on).")
    harvester = make_hook_harvester(model, hook_name)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if excluded_ids is None:
        excluded_ids = excluded_token_ids(tokenizer) if tokenizer is not None else []
    excluded = torch.as_tensor(excluded_ids, dtype=torch.long).reshape(-1)
    sae.eval()
    device = sae.W_dec.device
    collector: LatentCollector | None = None
    bar = tqdm(total=cfg.total_tokens, unit="tok", unit_scale=True, desc="inspect", disable=not progress)
    try:
        for tokens in token_batches(contexts, cfg.batch_size):
            tokens = tokens.long().cpu()
            x = harvester(tokens)[hook_name]
            flat = rearrange(x, "b t d -> (b t) d").to(device, sae.W_dec.dtype)
            sae.check_input(flat)
            if collector is None:
                collector = LatentCollector(sae.d_sae, tokens.shape[1], cfg, device)
            keep = keep_mask(tokens, excluded)
            collector.update(encode_codes(sae, flat), tokens, keep)
            bar.update(int(keep.sum()))
            if collector.n_tokens >= cfg.total_tokens:
                break
    finally:
        bar.close()
    if collector is None or collector.n_tokens == 0:
        raise ValueError("the contexts hold no non-special tokens to inspect; pass more text.")
    return collector.finish(sae, model, tokenizer, hook_name)
