"""OmegaConf resolvers the configs use, registered on import (by `saelab.app.cli`, which every command and
every submitted SLURM job imports, so jobs resolve their run folders the same way).

`saelab_dirname`: a sweep job's folder name from Hydra's override_dirname, one flat name of at most
MAX_DIRNAME characters (a '/' in a value would nest the folders; every override of a long command line in one
name would pass the file system's 255-byte limit): '/' becomes '_', and a longer name keeps its start plus a
hash of the whole.
"""

from __future__ import annotations

import hashlib

from omegaconf import OmegaConf

MAX_DIRNAME = 200


def safe_dirname(name: str) -> str:
    """`name` as one flat folder name of at most MAX_DIRNAME characters (see the module docstring)."""
    flat = name.replace("/", "_")
    if len(flat) <= MAX_DIRNAME:
        return flat
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    return f"{flat[: MAX_DIRNAME - len(digest) - 1]}-{digest}"


OmegaConf.register_new_resolver("saelab_dirname", safe_dirname, replace=True)
