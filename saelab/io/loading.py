"""Load an SAE from a local directory, a saelab training run or checkpoint, or a Hugging Face hub repo.

A directory holds `cfg.json` + `sae_weights.safetensors` in saelab's or SAELens's layout (see
`saelab.io.saelens`), or a peer's layout converted on reading: EleutherAI sparsify's `cfg.json` +
`sae.safetensors` (`saelab.io.sparsify`) or dictionary_learning's `config.json` + `ae.pt`
(`saelab.io.dictionary_learning`). Whatever the source, the SAE returned takes raw model activations:
input scales (saelab's trainer scale in a checkpoint, SAELens's "expected_average_only_in" factor) are
folded in.
"""

from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path
from typing import Any

import torch

from saelab.core.device import resolve_device
from saelab.core.memory import check_fits
from saelab.io import dictionary_learning, sparsify
from saelab.io.files import read_json_object
from saelab.io.layout import STATE_FILE, TRAINING_WEIGHTS_FILE, list_checkpoints
from saelab.io.saelens import dtype_name, needs_input_scale, to_saelab
from saelab.sae.base import CONFIG_FILE, DTYPES, SAE, WEIGHTS_FILE, load_weights
from saelab.sae.registry import get_sae_class

#: SAELens training checkpoints store the activation scale they have not folded in yet here.
SCALER_FILE = "activation_scaler.json"
#: Peers' layouts read_files converts: name -> (config file, weights file, reader).
PEER_LAYOUTS = {
    "sparsify": (sparsify.CONFIG_FILE, sparsify.WEIGHTS_FILE, sparsify.read_sparsify),
    "dictionary_learning": (
        dictionary_learning.CONFIG_FILE,
        dictionary_learning.WEIGHTS_FILE,
        dictionary_learning.read_dictionary_learning,
    ),
}
LAYOUTS_TEXT = (
    f"{CONFIG_FILE} + {WEIGHTS_FILE} (saelab, SAELens), {sparsify.CONFIG_FILE} + {sparsify.WEIGHTS_FILE} "
    f"(sparsify) or {dictionary_learning.CONFIG_FILE} + {dictionary_learning.WEIGHTS_FILE} (dictionary_learning)"
)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[^/].*)?$")
#: A Hydra run folder's date/time components (`outputs/2026-01-01/12-00-00`): a local path, never a hub repo.
_HYDRA_RUN = re.compile(r"(^|/)\d{4}-\d{2}-\d{2}/\d{2}-\d{2}-\d{2}(/|$)")


def load_sae(
    source: str | Path,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    norm_scaling_factor: float | None = None,
    cache_dir: str | Path | None = None,
) -> SAE:
    """Load an SAE ready for encode/decode on raw activations, on `device` (cast to `dtype` if given).

    source: an SAE directory (saelab, SAELens, sparsify or dictionary_learning layout); a saelab run directory
    (loads `sae/`, else the newest checkpoint); a checkpoint directory (its trainer input scale is folded in);
    or a Hugging Face repo id ("owner/name", optionally followed by "/sub/folder") fetched with
    `huggingface_hub` into `cache_dir` (respects HF_HUB_OFFLINE). subfolder: folder inside the directory or
    repo (sparsify's hookpoint folder, e.g. "layers.6"). norm_scaling_factor: the
    activation factor of a SAELens SAE saved with normalize_activations="expected_average_only_in".
    The SAE's `cfg.metadata` holds model/hook/layer, training tokens, metrics and `loaded_from`.
    """
    target = device if isinstance(device, torch.device) else resolve_device(device, "device")
    folder, origin = locate(source, subfolder, revision, cache_dir)
    raw, state = read_files(folder, device=target)
    if origin["kind"] == "hub" and norm_scaling_factor is None and needs_input_scale(raw):
        with contextlib.suppress(FileNotFoundError):  # if absent, build_from_files asks for the factor
            hub_file(origin["repo_id"], origin["subfolder"], SCALER_FILE, revision, cache_dir)
    input_scale, extra = input_scale_of(raw, folder, origin["kind"] == "checkpoint", norm_scaling_factor)
    sae = build_from_files(raw, state, folder, input_scale=input_scale, dtype=dtype)
    sae.cfg.metadata.update(extra)
    sae.cfg.metadata["loaded_from"] = origin
    return sae.to(target).eval()


def locate(
    source: str | Path, subfolder: str | None, revision: str | None, cache_dir: str | Path | None
) -> tuple[Path, dict[str, Any]]:
    """(local folder holding cfg.json, description of where it came from) for any load_sae source."""
    local = Path(source).expanduser()
    if local.is_dir():
        folder, is_checkpoint = resolve_local(local / subfolder if subfolder else local)
        return folder, {"kind": "checkpoint" if is_checkpoint else "directory", "path": str(folder)}
    if local.exists():
        raise NotADirectoryError(
            f"{source} is a file; load_sae takes the folder holding an SAE's files ({LAYOUTS_TEXT}), e.g. "
            f"{str(local.parent)!r}, a run directory or a checkpoint."
        )
    if looks_local(source):
        missing = first_missing(local)
        raise FileNotFoundError(
            f"{source} is not a directory ({missing} does not exist); pass a saelab run directory, an SAE "
            "directory or a checkpoint (or a Hugging Face repo id such as 'owner/name')."
        )
    parts = str(source).split("/")
    repo_id, inner = "/".join(parts[:2]), "/".join([*parts[2:], *([subfolder] if subfolder else [])])
    try:
        folder = hub_folder(repo_id, inner, revision, cache_dir)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{err} (Tried {source!r} as a hub repo id because no local directory {local.absolute()} exists.)"
        ) from err
    return folder, {"kind": "hub", "repo_id": repo_id, "subfolder": inner, "revision": revision or "main"}


def looks_local(source: str | Path) -> bool:
    """Whether a source that is not an existing directory must be a local path rather than a hub repo id:
    a Path object, an absolute/relative/home path, anything not shaped 'owner/name[/sub/folder]', a Hydra run
    folder (`.../<date>/<time>`), or a path whose first component exists here (e.g. 'outputs/my_run' next to an
    'outputs' folder)."""
    text = str(source)
    if isinstance(source, Path) or text.startswith((".", "/", "~")) or "\\" in text:
        return True
    if _HYDRA_RUN.search(text):
        return True
    if not _REPO_ID.match(text):
        return True
    return Path(text.split("/")[0]).exists()


def first_missing(path: Path) -> Path:
    """The shortest prefix of `path` that does not exist (`path` itself if its parent exists)."""
    for prefix in reversed([path, *path.parents]):
        if not prefix.exists():
            return prefix
    return path


def hub_folder(repo_id: str, inner: str, revision: str | None, cache_dir: str | Path | None) -> Path:
    """Local folder holding the config and weights of the SAE at `inner` in a hub repo, in any known layout."""
    first_error = None
    for config_name, weights_name in [(CONFIG_FILE, WEIGHTS_FILE), *(v[:2] for v in PEER_LAYOUTS.values())]:
        try:
            folder = hub_file(repo_id, inner, config_name, revision, cache_dir).parent
            hub_file(repo_id, inner, weights_name, revision, cache_dir)
            return folder
        except HubUnreachableError:
            raise  # no connection: every other layout would fail the same way, after its own retries
        except FileNotFoundError as err:
            first_error = first_error or err
    raise FileNotFoundError(f"{first_error} No known SAE layout is there either: {LAYOUTS_TEXT}.")


def peer_layout(folder: Path) -> str | None:
    """Name of the peer layout whose config and weights files `folder` holds, or None."""
    for name, (config_name, weights_name, _) in PEER_LAYOUTS.items():
        if (folder / config_name).is_file() and (folder / weights_name).is_file():
            return name
    return None


def input_scale_of(
    raw: dict[str, Any], folder: Path, is_checkpoint: bool, given: float | None
) -> tuple[float | None, dict[str, Any]]:
    """(factor the SAE's inputs were scaled by in training and is still to be folded, extra metadata)."""
    if is_checkpoint:
        if given is not None:
            raise ValueError(
                f"{folder} is a saelab checkpoint that stores its input scale; drop norm_scaling_factor."
            )
        scale, meta = checkpoint_scale(folder)
        return (None if checkpoint_weights_folded(folder, raw) else scale), meta
    if given is not None and not needs_input_scale(raw):
        raise ValueError(
            f"{folder / CONFIG_FILE} says normalize_activations={raw.get('normalize_activations', 'none')!r}: "
            "its weights already take raw activations, so norm_scaling_factor must not be given."
        )
    if given is not None:
        return check_scale(given, "norm_scaling_factor"), {}
    if needs_input_scale(raw) and (folder / SCALER_FILE).is_file():
        scaler = read_json_object(folder / SCALER_FILE)
        if "scaling_factor" not in scaler:
            raise ValueError(
                f"{folder / SCALER_FILE} has no 'scaling_factor'; pass norm_scaling_factor=<float>."
            )
        return check_scale(scaler["scaling_factor"], f"scaling_factor in {folder / SCALER_FILE}"), {}
    return None, {}


def check_scale(value: Any, name: str) -> float:
    """`value` as the factor activations were scaled by in training: a finite number > 0, else a ValueError
    naming `name` (folding NaN, Inf, 0 or a negative factor would give an SAE that silently computes garbage)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(
            f"{name}={value!r} must be a finite number > 0: the factor activations were multiplied by in "
            "training (SAELens lists it per release as norm_scaling_factor)."
        )
    return float(value)


def checkpoint_weights_folded(folder: Path, raw: dict[str, Any]) -> bool:
    """Whether checkpoint `folder`'s sae_weights.safetensors (config raw) has the input scale folded in.

    Checkpoints keep the training-space weights apart in training_weights.safetensors and the scale folded
    into sae_weights.safetensors; older ones (no training_weights.safetensors, no `input_scale_folded` in the
    config's metadata) hold only the training-space weights. Folded weights without the training-space file
    are a damaged checkpoint: reading them as training-space weights would fold the scale twice.
    """
    if (folder / TRAINING_WEIGHTS_FILE).is_file():
        return True
    metadata = raw.get("metadata")
    if isinstance(metadata, dict) and "input_scale_folded" in metadata:
        raise FileNotFoundError(
            f"{folder / TRAINING_WEIGHTS_FILE} is missing, but {folder / CONFIG_FILE} says its weights have the "
            "input scale folded in: the checkpoint is damaged. Resume or load from another checkpoint (or the "
            "run's sae/ folder)."
        )
    return False


def read_sae_dir(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | None = None,
    weights_name: str = WEIGHTS_FILE,
) -> SAE:
    """The SAE exactly as stored in directory `path` (cfg.json + `weights_name`; no input scale folded in):
    for resuming training from a checkpoint's training-space weights."""
    folder = Path(path)
    raw, state = read_files(folder, weights_name)
    return build_from_files(raw, state, folder, dtype=dtype, weights_name=weights_name).to(device).eval()


def resolve_local(folder: Path) -> tuple[Path, bool]:
    """(directory holding cfg.json, whether it is a saelab training checkpoint) for a local source."""

    if (folder / CONFIG_FILE).is_file() or peer_layout(folder):
        return folder, (folder / STATE_FILE).is_file()
    if (folder / "sae" / CONFIG_FILE).is_file():
        return folder / "sae", False
    for root in (folder, folder / "checkpoints"):
        found = list_checkpoints(root)
        if found:
            return found[-1], True
    nested = [p for pattern in ("*", "*/*") for p in sorted(folder.glob(pattern)) if peer_layout(p)]
    nested += [p.parent for p in sorted(folder.glob(f"*/{CONFIG_FILE}")) if p.parent not in nested]
    hint = (
        f" It has SAEs in subfolders {[str(p.relative_to(folder)) for p in nested[:12]]}: pass subfolder=."
        if nested
        else ""
    )
    raise FileNotFoundError(
        f"{folder / CONFIG_FILE} is missing: an SAE directory holds {LAYOUTS_TEXT} (a saelab run directory "
        f"needs sae/ or checkpoints/step_*/).{hint}"
    )


def read_files(
    folder: Path, weights_name: str = WEIGHTS_FILE, device: torch.device | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(cfg.json dict, tensors) of an SAE directory (a peer's layout converted to saelab's); errors name the
    missing or corrupt file. Before loading, the config's sizes are checked against the weights file's header
    and the tensors against the free memory of the CPU (where they are read) and of `device` (where they go)."""
    layout = peer_layout(folder)
    if layout is not None and not (folder / weights_name).is_file():
        return PEER_LAYOUTS[layout][2](folder)
    cfg_path, weights_path = folder / CONFIG_FILE, folder / weights_name
    for needed in (cfg_path, weights_path):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed} is missing: an SAE directory holds {LAYOUTS_TEXT}.")
    raw = read_json_object(cfg_path)
    header = weights_header(weights_path)
    check_header_sizes(raw, header, cfg_path, weights_path)
    size = sum(numel * itemsize for _, numel, itemsize in header.values())
    what = f"loading {weights_path} ({size / 2**30:.2f} GiB of tensors"
    check_fits(2 * size, torch.device("cpu"), f"{what}, read and built into an SAE)", "Free memory first.")
    if device is not None and device.type != "cpu":
        check_fits(
            size, device, f"{what} on {device})", "Load it on another device, or with dtype='bfloat16'."
        )
    return raw, load_weights(weights_path)


#: safetensors dtype names -> bytes per element.
_ITEMSIZE = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
}


def weights_header(path: Path) -> dict[str, tuple[tuple[int, ...], int, int]]:
    """name -> (shape, elements, bytes per element) of every tensor in a safetensors file, read from its header
    alone (no tensor is loaded)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {name: f.get_slice(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
            found = {name: (tuple(s.get_shape()), s.get_dtype()) for name, s in slices.items()}
    except Exception as err:  # safetensors raises several types for truncated/corrupt files
        raise ValueError(
            f"could not read SAE weights from {path}: {err}. The file is missing or corrupt."
        ) from err
    return {
        name: (shape, math.prod(shape), _ITEMSIZE.get(dtype, 1)) for name, (shape, dtype) in found.items()
    }


def check_header_sizes(
    raw: dict[str, Any],
    header: dict[str, tuple[tuple[int, ...], int, int]],
    cfg_path: Path,
    weights_path: Path,
) -> None:
    """Before anything is loaded or built: the sizes cfg.json claims (d_in, d_sae; d_out where it has one)
    against the shapes in the weights file's header, for the tensors every layout names alike (W_enc [d_in,
    d_sae], W_dec [d_sae, d_out], b_enc [d_sae]). A config claiming millions of latents next to a small file
    would otherwise allocate them before the mismatch is found."""
    sizes = {name: raw.get(name) for name in ("d_in", "d_sae", "d_out")}
    if any(not isinstance(sizes[n], int) or isinstance(sizes[n], bool) for n in ("d_in", "d_sae")):
        return  # missing or malformed sizes are named when the config is read
    d_in, d_sae = sizes["d_in"], sizes["d_sae"]
    d_out = sizes["d_out"] if isinstance(sizes["d_out"], int) else d_in
    expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out), "b_enc": (d_sae,)}
    wrong = {k: (header[k][0], v) for k, v in expected.items() if k in header and header[k][0] != v}
    if wrong:
        raise ValueError(
            f"{weights_path} does not match {cfg_path} (d_in={d_in}, d_sae={d_sae}): wrong shapes (found, "
            f"expected) {wrong}. Nothing was built; pair the config with its own weights file."
        )


def build_from_files(
    raw: dict[str, Any],
    state: dict[str, torch.Tensor],
    folder: Path,
    input_scale: float | None = None,
    dtype: str | torch.dtype | None = None,
    weights_name: str = WEIGHTS_FILE,
) -> SAE:
    """Build the SAE a (cfg.json, tensors) pair describes, with `input_scale` folded in (in float64)."""
    cfg_path, weights_path = folder / CONFIG_FILE, folder / weights_name
    layout = peer_layout(folder)
    if layout is not None and not weights_path.is_file():  # a peer's files, converted by read_files
        cfg_path, weights_path = (folder / name for name in PEER_LAYOUTS[layout][:2])
    if needs_input_scale(raw) and input_scale is None:
        raise ValueError(
            f"{cfg_path}: normalize_activations={raw['normalize_activations']!r} but the factor activations "
            "were scaled by is not stored with the SAE; pass norm_scaling_factor=<float> (SAELens lists it per "
            "release as norm_scaling_factor), or norm_scaling_factor=1.0 to use the SAE on pre-scaled inputs."
        )
    target = dtype_name(dtype, "load_sae") if dtype is not None else None
    cfg, tensors = to_saelab(raw, state, where=str(cfg_path), dtype=target)
    target = cfg["dtype"]
    work = "float64" if input_scale is not None else target  # fold the scale before rounding to the target
    cls = get_sae_class(cfg["architecture"])
    missing_fields = [name for name in cls.required_fields if name not in cfg]
    if missing_fields:
        raise ValueError(
            f"{cfg_path} has no {missing_fields} field(s), which a {cls.architecture} SAE needs (they decide "
            "what it computes; no default is assumed): add them to the file."
        )
    check_finite(tensors, cls.unset_when_nan, weights_path)
    try:
        with torch.device("meta"):  # the shapes the config describes, nothing allocated
            shapes = cls.from_config_dict({**cfg, "dtype": work})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{cfg_path}: {err}") from err
    expected = {k: tuple(v.shape) for k, v in shapes.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))
        unexpected = sorted(set(got) - set(expected))
        wrong = {k: (got[k], expected[k]) for k in set(got) & set(expected) if got[k] != expected[k]}
        raise ValueError(
            f"{weights_path} does not match {cfg_path}: missing tensors {missing}, unexpected tensors "
            f"{unexpected}, wrong shapes (found, expected) {wrong}."
        )
    sae = cls.from_config_dict({**cfg, "dtype": work})
    sae.load_state_dict(tensors)
    if input_scale is not None:
        sae.fold_input_scale(input_scale)
        sae.cfg.metadata["input_scale_folded"] = input_scale * sae.cfg.metadata.get("input_scale_folded", 1.0)
    sae.cfg.dtype = target
    return sae.to(DTYPES[target])


def check_finite(tensors: dict[str, torch.Tensor], unset_when_nan: frozenset[str], where: Path) -> None:
    """Raise naming every tensor holding NaN or Inf (except all-NaN "not estimated yet" tensors)."""
    bad = []
    for name, value in tensors.items():
        if not value.is_floating_point() or bool(torch.isfinite(value).all()):
            continue
        if name in unset_when_nan and bool(value.isnan().all()):
            continue
        bad.append(f"{name} ({int((~torch.isfinite(value)).sum())} of {value.numel()} values)")
    if bad:
        raise ValueError(
            f"{where}: tensors hold NaN or Inf: {', '.join(bad)}. The SAE diverged in training or the file is "
            "corrupt; load an earlier checkpoint or retrain."
        )


def checkpoint_scale(folder: Path) -> tuple[float, dict[str, Any]]:
    """(input scale, metadata) from the trainer state of saelab checkpoint `folder`."""

    state_path = folder / STATE_FILE
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        meta = {
            "checkpoint_step": int(state["step"]),
            "training_tokens": int(state["tracker"]["tokens_seen"]),
        }
        return float(state["input_scale"]), meta
    except Exception as err:
        what = f"has no entry {err}" if isinstance(err, KeyError) else f"could not be read ({err})"
        raise ValueError(
            f"{state_path} {what}: the checkpoint is corrupt or not a saelab checkpoint; load another "
            "checkpoint or the run's sae/ folder."
        ) from err


def hub_file(
    repo_id: str, subfolder: str, filename: str, revision: str | None, cache_dir: str | Path | None
) -> Path:
    """Local path of one file of a hub repo, downloaded with `huggingface_hub` or found in its cache."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = "/".join(p for p in (repo_id, subfolder, filename) if p)
    where = f"{name} (revision {revision or 'main'})"
    try:
        return Path(
            hf_hub_download(
                repo_id, filename, subfolder=subfolder or None, revision=revision, cache_dir=cache_dir
            )
        )
    except LocalEntryNotFoundError as err:
        cache = cache_dir or "$HF_HUB_CACHE"
        if constants.HF_HUB_OFFLINE:  # only the cache was searched (quickly): other layouts may be there
            raise FileNotFoundError(
                f"{where} is not in the local Hugging Face cache {cache}; HF_HUB_OFFLINE is set, so nothing "
                "was downloaded (unset it to download)."
            ) from err
        raise HubUnreachableError(
            f"{where} is not in the local Hugging Face cache {cache} and the hub could not be reached; "
            "check the connection (or the repo id, if a local path was meant)."
        ) from err
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise FileNotFoundError(
            f"{where} is not on the Hugging Face hub ({type(err).__name__}). Check the repo id and subfolder."
        ) from err


class HubUnreachableError(FileNotFoundError):
    """A hub file is not cached and cannot be fetched (offline mode or no connection)."""
