"""Read a written feature browser back in Python: per latent its examples as token texts with activations, and
the site's random windows. Explanations are made from this, so they work on any site, however it was collected.

    site = SiteReader("outputs/run/inspect")
    for ex in site.top(12): print(ex.value, "".join(ex.tokens))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saelab.inspect.codec import COFIRING, PAIR, ExampleCodec, decode_list, decode_tokens
from saelab.inspect.site import read_script


@dataclass
class SiteExample:
    """A window of a context: token texts, the latent's activation on each (0 where it does not fire), the
    index of the example's own token in it (`hit`, -1 for a random window), and key: (site context, position)."""

    tokens: list[str]
    acts: list[float]
    hit: int
    value: float
    key: tuple[int, int]


class SiteReader:
    """The data files of a site written by `write_site` (loaded lazily, file by file)."""

    def __init__(self, site: str | Path):
        self.site = Path(site)
        index_file = self.site / "data" / "index.js"
        if not index_file.is_file():
            raise FileNotFoundError(
                f"{self.site} holds no feature browser (no data/index.js); run `saelab inspect` first, or pass "
                "output_dir= the folder it wrote."
            )
        self.index = read_script(index_file)
        self.meta: dict[str, Any] = self.index["meta"]
        self.d_sae: int = self.meta["d_sae"]
        self.vocab: dict[str, str] = read_script(self.site / "data" / "vocab.js")
        self.codec = ExampleCodec(self.meta["context_bytes"], self.meta["position_bytes"])
        self._files: dict[str, Any] = {}

    def _file(self, name: str) -> Any:
        if name not in self._files:
            self._files[name] = read_script(self.site / "data" / name)
        return self._files[name]

    def record(self, latent: int) -> dict[str, Any]:
        """The latent's panel record (see `saelab.inspect.site.latent_records`), its examples and lists decoded:
        top / bands examples as [context, position, value, offset, act, ...], promoted / suppressed / nearest
        as [id, value], co-firing as [id, count, Jaccard]."""
        if not 0 <= latent < self.d_sae:
            raise IndexError(f"latent {latent} does not exist: the site has latents 0-{self.d_sae - 1}.")
        per_file = self.meta["latents_per_file"]
        record = dict(self._file(f"latents_{latent // per_file}.js")[latent % per_file])
        record["top"] = self.codec.decode(record["top"])
        record["bands"] = [[b, count, self.codec.decode(rows)] for b, count, rows in record["bands"]]
        for name in ("promoted", "suppressed", "nearest"):
            record[name] = decode_list(record[name], PAIR)
        record["cofiring"] = decode_list(record["cofiring"], COFIRING)
        return record

    def context(self, row: int) -> list[int]:
        per_file = self.meta["contexts_per_file"]
        name = f"contexts_{row // per_file}.js"
        if name not in self._files:
            tokens = decode_tokens(read_script(self.site / "data" / name), self.meta["token_bytes"])
            size = self.meta["context_size"]
            self._files[name] = [tokens[i : i + size] for i in range(0, len(tokens), size)]
        return self._files[name][row % per_file]

    def token_text(self, token_id: int) -> str:
        return self.vocab.get(str(token_id), f"<{token_id}>")

    def window(self, context: int, pos: int, pairs: list[float] = (), value: float = 0.0, hit: bool = True):
        """The example at (site context, position) with its activation `value` there and (offset, act) pairs
        elsewhere, as a `SiteExample` over its window."""
        tokens = self.context(context)
        start = max(pos - self.meta["window_before"], 0)
        stop = min(pos + self.meta["window_after"] + 1, len(tokens))
        acts = [0.0] * (stop - start)
        if hit:
            acts[pos - start] = value
        for offset, act in zip(pairs[::2], pairs[1::2], strict=True):
            acts[pos + int(offset) - start] = act
        texts = [self.token_text(t) for t in tokens[start:stop]]
        return SiteExample(texts, acts, pos - start if hit else -1, value, (context, pos))

    def _example(self, row: list[Any]) -> SiteExample:
        return self.window(row[0], row[1], row[3:], row[2])

    def top(self, latent: int) -> list[SiteExample]:
        """The latent's top examples, by activation descending."""
        return [self._example(row) for row in self.record(latent)["top"]]

    def bands(self, latent: int) -> list[tuple[int, int, list[SiteExample]]]:
        """(interval index, firings in it, its sampled examples) per interval, highest first."""
        return [
            (b, count, [self._example(r) for r in rows]) for b, count, rows in self.record(latent)["bands"]
        ]

    def random_windows(self) -> list[tuple[SiteExample, set[int]]]:
        """The uniformly sampled windows and the latents firing in each."""
        return [(self.window(c, p, hit=False), set(latents)) for c, p, latents in self._file("random.js")]

    def live_latents(self) -> list[int]:
        return [i for i, fires in enumerate(self.index["fires"]) if fires > 0]
