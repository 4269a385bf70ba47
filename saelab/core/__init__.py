"""Foundations every layer may use: atomic file writes, config value checks, derived seeds, settings diffs,
device resolution. Imports nothing else from saelab."""
