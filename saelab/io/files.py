"""Reading peers' config files with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; a missing, corrupt or non-object file raises naming it."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing.") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the file is corrupt.") from err
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text ({err.reason} at byte {err.start}): JSON config files are UTF-8; the file "
            "is corrupt or not a config."
        ) from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path} holds a JSON {type(raw).__name__}, expected an object.")
    return raw


def json_flag(raw: dict[str, Any], key: str, default: bool, place: str) -> bool:
    """The true/false field `key` of a config dict (`default` when absent or null); anything else (a string
    such as "false", which Python would take as true, or a number) raises naming `place` and the field."""
    value = raw.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"{place}: {key}={value!r} must be true or false.")
    return value
