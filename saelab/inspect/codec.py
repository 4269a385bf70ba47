"""Binary encodings of the site's bulk numbers, stored as base64 text inside its JSON data files.

All little-endian; `static/app.js` decodes the same layouts (`decodeExamples`, `decodeList`, `decodeTokens`).

- examples: one after another, each: context (uint16, or uint32 when the site holds 65536 or more contexts:
  meta `context_bytes`), position (uint8, or uint16 for contexts over 256 tokens: meta `position_bytes`), value
  (float16), n (uint8), then n times (offset int8, activation float16): the latent's other nonzero activations
  in the example's window, at offsets from its token. Zeros are not stored.
- ranked lists (`PAIR`): id (uint32), value (float16) per entry; co-firing (`COFIRING`): id (uint32), count
  (uint32), Jaccard (float16).
- token ids: uint16, or uint32 for vocabularies of 65536 or more tokens (meta `token_bytes`).

Float16 keeps about 3.3 significant digits (relative error <= 2^-11); values beyond +-65504 are clipped.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

PAIR = np.dtype([("id", "<u4"), ("value", "<f2")])
COFIRING = np.dtype([("id", "<u4"), ("count", "<u4"), ("jaccard", "<f2")])
EXTRA = np.dtype([("offset", "i1"), ("act", "<f2")])
FLOAT16_MAX = 65504.0


def b64(data: np.ndarray | bytes) -> str:
    return base64.b64encode(data.tobytes() if isinstance(data, np.ndarray) else data).decode("ascii")


def half(values: Tensor) -> np.ndarray:
    """float values -> float16 numpy, clipped to the float16 range (NaN stays NaN)."""
    return values.float().clamp(-FLOAT16_MAX, FLOAT16_MAX).numpy().astype("<f2")


def field_bytes(count: int, smallest: int) -> int:
    """Bytes of an unsigned field holding values below `count`: `smallest` (1 or 2) if enough, else 2 or 4."""
    return next(b for b in (1, 2, 4) if b >= smallest and count <= 2 ** (8 * b))


@dataclass
class ExampleCodec:
    """The example layout for one site: bytes of the context and position fields."""

    context_bytes: int
    position_bytes: int

    @property
    def head(self) -> np.dtype:
        unsigned = {1: "u1", 2: "<u2", 4: "<u4"}
        return np.dtype(
            [
                ("context", unsigned[self.context_bytes]),
                ("position", unsigned[self.position_bytes]),
                ("value", "<f2"),
                ("n", "u1"),
            ]
        )

    def encode(
        self,
        group: Tensor,
        context: Tensor,
        position: Tensor,
        value: Tensor,
        extras: Tensor,
        before: int,
        n_groups: int,
    ) -> list[str]:
        """Examples [M] sorted by group (group, context, position, value) and the other nonzero activations of
        their windows, extras [M, W] (0 where none, including the example's own token at index `before`) ->
        one base64 string per group (n_groups)."""
        M = group.numel()
        head = np.zeros(M, self.head)
        head["context"], head["position"], head["value"] = context.numpy(), position.numpy(), half(value)
        e, w = (extras != 0).nonzero(as_tuple=True)
        n = torch.bincount(e, minlength=M)
        if M and int(n.max()) > 255:
            raise ValueError(
                "a window holds more than 255 nonzero activations; use a shorter inspect window."
            )
        head["n"] = n.numpy()
        tail = np.zeros(e.numel(), EXTRA)
        tail["offset"], tail["act"] = (w - before).numpy(), half(extras[e, w])
        H = self.head.itemsize
        size = H + EXTRA.itemsize * n
        start = size.cumsum(0) - size
        buffer = np.empty(int(size.sum()), np.uint8)
        buffer[(start[:, None] + torch.arange(H)).reshape(-1).numpy()] = head.view(np.uint8)
        first_extra = n.cumsum(0) - n
        at = start[e] + H + EXTRA.itemsize * (torch.arange(e.numel()) - first_extra[e])
        buffer[(at[:, None] + torch.arange(EXTRA.itemsize)).reshape(-1).numpy()] = tail.view(np.uint8)
        ends = torch.bincount(group, weights=size.double(), minlength=n_groups).long().cumsum(0).tolist()
        return [b64(buffer[a:b]) for a, b in zip([0, *ends[:-1]], ends, strict=True)]

    def decode(self, text: str) -> list[list[float]]:
        """Rows [context, position, value, offset, act, ...] of a string from `encode`."""
        data, out, at, head = base64.b64decode(text), [], 0, self.head
        while at < len(data):
            h = np.frombuffer(data, head, 1, at)[0]
            at += head.itemsize
            row = [int(h["context"]), int(h["position"]), float(h["value"])]
            for extra in np.frombuffer(data, EXTRA, int(h["n"]), at):
                row += [int(extra["offset"]), float(extra["act"])]
            at += EXTRA.itemsize * int(h["n"])
            out.append(row)
        return out


def encode_pairs(ids: Tensor, values: Tensor) -> list[str]:
    """Ranked lists ids, values [L, m] (id -1: empty) -> one base64 string per row."""
    out = []
    for row_ids, row_values in zip(ids, values, strict=True):
        keep = row_ids >= 0
        entries = np.zeros(int(keep.sum()), PAIR)
        entries["id"], entries["value"] = row_ids[keep].numpy(), half(row_values[keep])
        out.append(b64(entries))
    return out


def encode_cofiring(ids: Tensor, counts: Tensor, jaccard: Tensor) -> list[str]:
    """Co-firing lists [L, m] (id -1 or count 0: left out) -> one base64 string per row."""
    out = []
    for row_ids, row_counts, row_jaccard in zip(ids, counts, jaccard, strict=True):
        keep = (row_ids >= 0) & (row_counts > 0)
        entries = np.zeros(int(keep.sum()), COFIRING)
        entries["id"], entries["count"] = row_ids[keep].numpy(), row_counts[keep].numpy()
        entries["jaccard"] = half(row_jaccard[keep])
        out.append(b64(entries))
    return out


def decode_list(text: str, layout: np.dtype) -> list[list[float]]:
    """Rows of a ranked list (PAIR) or co-firing list (COFIRING) string."""
    return [[x.item() for x in entry] for entry in np.frombuffer(base64.b64decode(text), layout)]


def encode_tokens(tokens: Tensor, nbytes: int) -> str:
    return b64(tokens.numpy().astype("<u2" if nbytes == 2 else "<u4"))


def decode_tokens(text: str, nbytes: int) -> list[int]:
    return np.frombuffer(base64.b64decode(text), "<u2" if nbytes == 2 else "<u4").astype(np.int64).tolist()
