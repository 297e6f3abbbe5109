"""Checkpoints: atomic full-state files, a ``latest`` pointer, and ``load_checkpoint``.

A checkpoint is a dict saved with ``torch.save``: ``format_version``, ``step``, ``config``
(the resolved config as a plain dict, so sampling needs nothing else), ``model``, ``ema``,
``optimizer`` state dicts, ``scaler`` (the fp16 GradScaler's state, restored on resume; None
for fp32/bf16; absent in older files), ``rng`` and version strings. Run folders keep them under
``checkpoints/ckpt_{step:08d}.pt`` with a text file ``checkpoints/latest`` naming the newest
and, in runs that evaluate while training, ``checkpoints/best`` naming the best-scored one
(never pruned while it is best).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..core.unet import build_model
from ..errors import CheckpointError
from ..util.dist import note, pick_device, world_size
from ..util.fileio import atomic_torch_save, atomic_write_text, remove_stale_temps, sha256_file
from .config import Config, config_from_saved

FORMAT_VERSION = 1
LATEST = "latest"
BEST = "best"
POINTERS = (LATEST, BEST)  # the checkpoint a run folder stands for: `s2dm sample --which`


def checkpoint_name(step: int) -> str:
    return f"ckpt_{step:08d}.pt"


def checkpoint_step(path: Union[str, Path]) -> int:
    """The training step of a checkpoint (file or run folder): from its file name, as
    ``save_run_checkpoint`` names it, without loading it; else read from the file."""
    path = resolve_checkpoint(path)
    match = re.fullmatch(r"ckpt_(\d{8})\.pt", path.name)
    return int(match.group(1)) if match else int(read_checkpoint(path)["step"])


def save_run_checkpoint(ckpt_dir: Union[str, Path], state: dict, keep_last: int) -> Path:
    """Save ``state`` (which must hold ``step``), point ``latest`` at it, prune old ones."""
    ckpt_dir = Path(ckpt_dir)
    state = {"format_version": FORMAT_VERSION, **state}
    path = ckpt_dir / checkpoint_name(state["step"])
    atomic_torch_save(state, path)
    point(ckpt_dir, LATEST, path)
    prune(ckpt_dir, keep_last)
    remove_stale_temps(ckpt_dir)  # half-written files of a save that a kill interrupted (one writer: rank 0)
    return path


def prune(ckpt_dir: Union[str, Path], keep_last: int) -> None:
    """Delete the checkpoints older than ``latest`` but its ``keep_last`` predecessors and the
    ``best`` one; called again when ``best`` moves, so that the one it left goes too."""
    ckpt_dir = Path(ckpt_dir)
    newest, best = pointer_target(ckpt_dir, LATEST), pointer_target(ckpt_dir, BEST)
    if newest is None:
        return
    # Only the ones before it: a later one is a file a resume found corrupt and passed over,
    # which this run's own save of that step replaces.
    old = [p for p in sorted(ckpt_dir.glob("ckpt_*.pt")) if p.name < newest.name and p != best]
    for stale in old[: max(0, len(old) - keep_last)]:
        stale.unlink(missing_ok=True)


def checkpoint_stamp(path: Union[str, Path]) -> str:
    """``size:mtime_ns`` of a checkpoint file: a file saved again at the same path and step (a
    run retrained with other settings) has another stamp, so records made from the old one are
    not reused (hashing a CIFAR10 checkpoint would cost a second per look)."""
    try:
        st = Path(path).stat()
    except FileNotFoundError:
        raise _gone(path) from None
    return f"{st.st_size}:{st.st_mtime_ns}"


def _gone(path) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} was removed while s2dm read it (a run training meanwhile "
                           "keeps only its newest checkpoints: train.keep_last); run the command again")


def point(ckpt_dir: Union[str, Path], name: str, target: Union[str, Path]) -> None:
    """Point ``ckpt_dir/name`` (``latest``, ``best``) at the checkpoint file ``target``."""
    atomic_write_text(Path(ckpt_dir) / name, Path(target).name + "\n", fsync=True)


def pointer_target(ckpt_dir: Union[str, Path], name: str) -> Optional[Path]:
    """The checkpoint file ``ckpt_dir/name`` points at, if the pointer and the file exist."""
    pointer = Path(ckpt_dir) / name
    if not pointer.is_file():
        return None
    target = Path(ckpt_dir) / pointer.read_text().strip()
    return target if target.is_file() else None


def resolve_checkpoint(path: Union[str, Path], which: str = LATEST) -> Path:
    """A checkpoint file, or a run folder / checkpoints folder (→ the checkpoint its pointer
    ``which`` names: ``latest``, the newest, or ``best``, the best-scored during training)."""
    if which not in POINTERS:
        raise CheckpointError(f"which must be one of {', '.join(POINTERS)}, not {which!r}", key="which")
    path = Path(path)
    if path.is_dir():
        ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        target = pointer_target(ckpt_dir, which)
        if target is not None:
            return target
        if which == BEST:
            raise CheckpointError(f"which best: {path} has no best checkpoint: the run did not evaluate while training "
                                  "(train.eval_every: 0) or has not reached its first evaluation", key="which")
        found = sorted(ckpt_dir.glob("ckpt_*.pt"))
        if not found:
            raise CheckpointError(f"no checkpoint found in {path}")
        return found[-1]
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if which != LATEST:
        raise CheckpointError(f"which {which} names a run folder's checkpoint, but {path} is a file", key="which")
    if path.name in POINTERS:  # checkpoints/best or checkpoints/latest itself: the file it names
        target = pointer_target(path.parent, path.name)
        if target is None:
            raise CheckpointError(f"{path} names {path.read_text().strip()!r}, which is not a checkpoint file "
                                  f"in {path.parent}")
        return target
    return path


def newest_run(root: Union[str, Path] = "runs") -> Path:
    """The run folder under ``root`` whose newest checkpoint was written last."""
    root = Path(root)
    found = []
    for pointer in root.glob(f"*/checkpoints/{LATEST}"):
        try:
            found.append((resolve_checkpoint(pointer.parent).stat().st_mtime, pointer.parent.parent))
        except (CheckpointError, OSError):
            continue  # a run without a readable checkpoint is not a candidate
    if not found:
        raise CheckpointError(f"no trained run under {root}/ (train one first, e.g. from the shipped config "
                              "digits.yaml, or name a checkpoint or run folder)")
    return max(found)[1]


def run_folder_of(path: Union[str, Path]) -> Optional[Path]:
    """The run folder a checkpoint file or folder belongs to (None for a loose file)."""
    path = Path(path)
    if path.is_dir():
        return path.parent if path.name == "checkpoints" else path
    return path.parent.parent if path.parent.name == "checkpoints" else None


def read_checkpoint(path: Union[str, Path], map_location="cpu") -> dict:
    """Load a checkpoint dict, turning unreadable or foreign files into one clear error."""
    path = resolve_checkpoint(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except FileNotFoundError:
        raise _gone(path) from None
    except Exception as exc:  # torch raises several types for truncated/corrupt zips
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(exc).__name__})") from None
    if not isinstance(state, dict) or "format_version" not in state or "model" not in state:
        raise CheckpointError(f"{path} is not an s2dm checkpoint")
    if state["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {state['format_version']}, newer than this s2dm "
            f"understands ({FORMAT_VERSION}); upgrade s2dm"
        )
    return state


def pick_weights(state: dict, use_ema: bool, path, verb: str) -> str:
    """``"ema"`` or ``"model"``: which weights of a checkpoint's ``state`` to ``verb`` with (the
    EMA ones by default). A checkpoint without EMA weights refuses ``use_ema``, before any work."""
    if use_ema and state.get("ema") is None:
        raise CheckpointError(f"{path} holds no EMA weights; {verb} the raw ones with use_ema=False", key="use_ema")
    return "ema" if use_ema else "model"


@dataclass
class LoadedCheckpoint:
    """What ``load_checkpoint`` returns: ready-to-call modules and the run's config."""

    model: nn.Module
    ema: Optional[nn.Module]
    config: Config
    step: int
    path: Path
    state: dict  # the raw dict (optimizer state, rng, versions)


def load_state_strict(module: nn.Module, weights: dict, what: str, path) -> None:
    try:
        module.load_state_dict(weights)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise CheckpointError(f"{path}: {what} weights do not fit the model its config describes: {first}") from None


def load_checkpoint(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> LoadedCheckpoint:
    """Load an s2dm checkpoint (a file or a run folder) into UNet modules in eval mode.

    >>> ck = s2dm.load_checkpoint("runs/digits")          # newest checkpoint of a run
    >>> eps = ck.ema(x_t, t)                                # EMA weights, ready to call
    """
    if device in (None, "auto") or world_size() == 1:  # under torchrun, any GPU the caller names
        device = pick_device(device)  # "auto" too, and an unavailable GPU is one clear error
    path = resolve_checkpoint(path)
    state = read_checkpoint(path)
    config = config_from_saved(state["config"])
    with torch.random.fork_rng(devices=[]):  # the initial weights, overwritten, draw from the caller's RNG
        model = build_model(config)
        ema = build_model(config) if state.get("ema") is not None else None
    load_state_strict(model, state["model"], "model", path)
    if ema is not None:
        load_state_strict(ema, state["ema"], "EMA", path)
        ema = ema.to(device).eval().requires_grad_(False)
    return LoadedCheckpoint(model.to(device).eval(), ema, config, int(state["step"]), path, state)


def first_mismatch(expected: dict, got: dict) -> Optional[str]:
    """The first key, in the model's order, where ``got`` does not fit ``expected`` (missing,
    another shape, or not in the model at all), described; None when every tensor fits."""
    for key, want in expected.items():
        if key not in got:
            return f"{key} is missing"
        if tuple(got[key].shape) != tuple(want.shape):
            return f"{key} has shape {tuple(got[key].shape)}, the model needs {tuple(want.shape)}"
    extra = next((key for key in got if key not in expected), None)
    return None if extra is None else f"{extra} is not in the model"


_ARCHITECTURE_KEYS = (("data", "channels"), ("data", "image_size"), ("model", "ch"), ("model", "ch_mult"),
                      ("model", "num_res_blocks"), ("model", "attn_resolutions"), ("model", "resamp_with_conv"))


def init_weights_from(path, model: nn.Module, ema: nn.Module, cfg, resumed: bool = False) -> Optional[dict]:
    """Start a NEW run from a checkpoint's weights (``s2dm train --init-from``): its EMA weights
    if it has them (what published DDPM weights are, and the better network of a run), else
    its raw ones, go into both the model and the EMA; strictly, so a wrong architecture is an
    error naming the first mismatching key. A resumed run keeps its own weights. Returns the
    provenance for the run log (path, sha256, size, which weights, source step)."""
    if path is None:
        return None
    if resumed:
        note(f"resuming the run folder; init_from {path} is ignored (its checkpoints hold the weights)")
        return None
    try:
        path = resolve_checkpoint(path)
        state = read_checkpoint(path)
    except CheckpointError as exc:
        # a damaged s2dm checkpoint and a published weights file (safetensors) read alike here
        raise CheckpointError(f"init_from: {exc} (if it holds published weights, convert them first: s2dm convert)",
                              key="init_from") from None
    which = "ema" if state.get("ema") is not None else "model"
    bad = first_mismatch(model.state_dict(), state[which])
    if bad:
        saved = state.get("config") or {}
        hint = next((f"; {a}.{b} is {saved[a][b]!r} there but {getattr(getattr(cfg, a), b)!r} in this config"
                     for a, b in _ARCHITECTURE_KEYS
                     if b in saved.get(a, {}) and saved[a][b] != getattr(getattr(cfg, a), b)), "")
        raise CheckpointError(f"init_from {path}: its weights do not fit this config's model: {bad}{hint}",
                              key="init_from")
    model.load_state_dict(state[which])
    ema.load_state_dict(state[which])
    return {"path": str(Path(path).resolve()), "sha256": sha256_file(path), "bytes": Path(path).stat().st_size,
            "weights": which, "step": int(state["step"]), "source": state.get("source")}
