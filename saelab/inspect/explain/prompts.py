"""Prompts for writing and scoring explanations, and the parsing of the answers.

Examples are shown as plain text with the tokens where the latent fires wrapped in << >>; the explanation
prompt also lists those tokens with their activation on a 0-10 scale of the latent's largest activation.
Scoring prompts ask for one 0/1 per numbered example as a bracketed list; an answer without exactly one such
list of the right length is a parse failure (`parse_labels` returns None).
"""

from __future__ import annotations

import re

from saelab.inspect.site_reader import SiteExample

SYSTEM = (
    "You study a neural network's internal features. Each feature responds to some pattern in text. "
    "Answer briefly and exactly in the format asked for."
)


def visible(token: str) -> str:
    return token.replace("\n", "\\n")


def marked_text(tokens: list[str], marked: list[bool]) -> str:
    """The text with each run of marked tokens wrapped in << >>."""
    out, inside = [], False
    for token, mark in zip(tokens, marked, strict=True):
        if mark and not inside:
            out.append("<<")
        if not mark and inside:
            out.append(">>")
        out.append(visible(token))
        inside = mark
    if inside:
        out.append(">>")
    return "".join(out)


def explanation_messages(examples: list[SiteExample], peak: float) -> list[dict[str, str]]:
    """Ask for an explanation of a latent from its examples (peak: its largest activation, for the scale)."""
    blocks = []
    for n, ex in enumerate(examples, 1):
        marked = [a > 0 for a in ex.acts]
        scale = [
            f"{visible(t).strip() or repr(t)} ({max(1, round(10 * a / peak)) if peak > 0 else 0})"
            for t, a in zip(ex.tokens, ex.acts, strict=True)
            if a > 0
        ]
        blocks.append(f"Example {n}: {marked_text(ex.tokens, marked)}\nActive tokens: {', '.join(scale)}")
    user = (
        "Below are text excerpts on which one feature fires. Tokens where it fires are wrapped in << >>, and "
        "listed after each excerpt with the feature's strength there from 1 (weak) to 10 (its strongest).\n\n"
        + "\n\n".join(blocks)
        + "\n\nWhat pattern does the feature respond to? Reply with one short phrase on a single line that "
        "starts with 'Explanation:'."
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def parse_explanation(answer: str) -> str:
    """The phrase after the last 'Explanation:' (else the answer's first non-empty line), one line, <= 300 chars."""
    found = re.findall(r"explanation\s*:\s*(.+)", answer, flags=re.IGNORECASE)
    lines = [line.strip() for line in (found[-1:] if found else answer.splitlines()) if line.strip()]
    text = lines[0] if lines else ""
    return text.strip(" \"'`*").strip()[:300]


def detection_messages(explanation: str, examples: list[SiteExample]) -> list[dict[str, str]]:
    """Does the feature fire anywhere in each (unmarked) example?"""
    listed = "\n".join(f"{n}. {''.join(visible(t) for t in ex.tokens)}" for n, ex in enumerate(examples, 1))
    user = (
        f"A feature is described as: {explanation}\n\nFor each excerpt below, answer 1 if the feature would fire "
        f"somewhere in it and 0 if not.\n\n{listed}\n\nReply with only a list of {len(examples)} numbers, "
        "e.g. [1, 0, 1]."
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def fuzzing_messages(explanation: str, examples: list[SiteExample], marks: list[list[bool]]) -> list[dict]:
    """Are the << >>-marked tokens of each example the ones the explanation points at?"""
    listed = "\n".join(
        f"{n}. {marked_text(ex.tokens, mark)}"
        for n, (ex, mark) in enumerate(zip(examples, marks, strict=True), 1)
    )
    user = (
        f"A feature is described as: {explanation}\n\nIn each excerpt below some tokens are wrapped in << >>. "
        "Answer 1 if the marked tokens are the ones the description points at, and 0 if they were marked at "
        f"random.\n\n{listed}\n\nReply with only a list of {len(examples)} numbers, e.g. [1, 0, 1]."
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def parse_labels(answer: str, count: int) -> list[bool] | None:
    """The last bracketed list of `count` zeros and ones in the answer, as booleans; None if there is none."""
    for match in reversed(re.findall(r"\[([^\[\]]*)\]", answer)):
        items = [item.strip() for item in match.split(",") if item.strip()]
        if len(items) == count and all(item in ("0", "1") for item in items):
            return [item == "1" for item in items]
    return None
