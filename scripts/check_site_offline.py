"""Check that a built documentation site loads nothing from the network: no `<script src>`, stylesheet, font or
`@import` / `url()` pointing at http(s). Usage: `python scripts/check_site_offline.py site` (run by .ci/run after
`mkdocs build`); exits 1 listing each remote reference."""

from __future__ import annotations

import re
import sys
from pathlib import Path

#: Attributes and CSS constructs that make a browser fetch a resource when the page is shown.
REMOTE = [
    re.compile(r"<script\b[^>]*\bsrc\s*=\s*[\"']?(?:https?:)?//", re.I),
    re.compile(
        r"<link\b(?=[^>]*\brel\s*=\s*[\"']?(?:stylesheet|preload|preconnect|icon|modulepreload))[^>]*"
        r"\bhref\s*=\s*[\"']?(?:https?:)?//",
        re.I,
    ),
    re.compile(r"<(?:img|iframe|source|audio|video)\b[^>]*\bsrc\s*=\s*[\"']?(?:https?:)?//", re.I),
    re.compile(r"@import\s+(?:url\()?\s*[\"']?(?:https?:)?//", re.I),
    re.compile(r"url\(\s*[\"']?(?:https?:)?//", re.I),
]


def remote_references(text: str) -> list[str]:
    """The snippets of `text` (HTML or CSS) that would fetch something from another host."""
    return [match.group(0)[:120] for pattern in REMOTE for match in pattern.finditer(text)]


def check_site(site: Path) -> list[str]:
    """`path: snippet` for every remote reference in the site's HTML and CSS files."""
    problems = []
    for path in sorted(site.rglob("*")):
        if path.suffix in (".html", ".css") and path.is_file():
            problems += [
                f"{path}: {snippet}" for snippet in remote_references(path.read_text(errors="replace"))
            ]
    return problems


def main(argv: list[str]) -> int:
    site = Path(argv[1] if len(argv) > 1 else "site")
    if not (site / "index.html").is_file():
        print(f"{site}/index.html not found: build the site first (mkdocs build)", file=sys.stderr)
        return 1
    problems = check_site(site)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"{len(problems)} remote references: the site must build and read offline", file=sys.stderr)
        return 1
    print(f"{site}: no remote scripts, stylesheets, fonts or images")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
