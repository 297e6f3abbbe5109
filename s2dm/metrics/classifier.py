"""The small CNN classifier behind FD-cnn: the Fréchet distance in its penultimate features.

Inception features mean little on 8x8 grayscale digits, and raw pixels (FD-pixels) weigh every
pixel alike; a classifier trained on the data set itself gives features that separate what
the data set's classes differ in. s2dm trains one per labelled data set (digits,
Fashion-MNIST) and image size, deterministically, and caches it:

- network: conv3x3(C→16)-ReLU, conv3x3(16→16)-ReLU, maxpool2, conv3x3(16→32)-ReLU, maxpool2,
  a fully-connected layer of D features (D = 64 up to 16x16 images, else 128), ReLU, then a
  10-way linear head. The features are that layer's output BEFORE its ReLU: after it, units
  that never fire on some images have zero variance and make the covariance singular. No
  batch norm or dropout: a feature depends on its image only.
- inputs: uint8 images mapped to [-1, 1] (``from_uint8``), in training and for features.
- training: Adam with a one-cycle learning rate, seeded initialisation and data order, on the
  CPU in one thread, so the weights depend only on the data, the seed and this code (and the
  torch build and CPU kind, which round floats their way).
- held-out accuracy: Fashion-MNIST's t10k test set; digits (no official split) holds out a
  stratified, seeded 20 % of its 1,797 images and trains on the rest.
- cache: ``<cache>/classifier-<dataset>-<hash12>.pt``, ``<cache>`` = ``$S2DM_CACHE`` or
  ``~/.cache/s2dm``; the hash is the sha256 of the training and held-out images and labels,
  ``CLASSIFIER_VERSION``, the seed, the architecture and the training recipe.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MetricError
from ..io.data import labelled_splits, load_labelled
from ..util.dist import note
from ..util.fileio import atomic_torch_save
from ..util.images import from_uint8
from ..util.workers import one_thread

CLASSIFIER_VERSION = 2  # bump when the network, the training or the data preparation changes
DEFAULT_SEED = 0
HELD_OUT = 0.2  # digits: the seeded, stratified fraction kept for the accuracy
CACHE_ENV = "S2DM_CACHE"
FILE_KIND = "s2dm-fd-cnn-classifier"
CLASSES = 10

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class Recipe:
    """How a classifier is trained: measured to reach ≳ 95 % (digits) and ≳ 89 % (Fashion-MNIST)
    held-out accuracy within seconds and well under a minute on one CPU thread."""

    epochs: float
    batch_size: int
    lr: float  # the one-cycle peak


RECIPES: Dict[str, Recipe] = {
    "digits": Recipe(epochs=15, batch_size=32, lr=3e-3),
    "fashion_mnist": Recipe(epochs=1.5, batch_size=32, lr=1.5e-3),
}


# ---------------------------------------------------------------- the network

def architecture(channels: int, image_size: int) -> dict:
    """The network's shape for C x S x S images: width 16, D = 64 up to 16x16, else 128."""
    if image_size < 4:
        raise MetricError(f"the FD-cnn classifier needs images of at least 4x4, not {image_size}x{image_size}",
                          key="data.image_size")
    return {"channels": int(channels), "image_size": int(image_size), "width": 16,
            "dim": 64 if image_size <= 16 else 128}


class SmallCNN(nn.Module):
    """conv-conv-pool-conv-pool → D features → ReLU → 10-way head."""

    def __init__(self, channels: int, image_size: int, width: int, dim: int, classes: int = CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, padding=1)
        side = image_size // 2 // 2
        self.fc = nn.Linear(2 * width * side * side, dim)
        self.head = nn.Linear(dim, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, D) of float images in [-1, 1], before the ReLU."""
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        return self.fc(x.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.features(x)))


# ---------------------------------------------------------------- data, key, cache

@dataclass
class LabelledData:
    """What a classifier is trained and scored on (uint8 images, int64 labels)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    test_name: str  # what the accuracy is measured on, in words


def held_out_split(labels: torch.Tensor, seed: int, fraction: float = HELD_OUT) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) indices: ``fraction`` of each class, drawn with a seeded torch
    generator (its stream does not change between machines), both sorted."""
    g = torch.Generator().manual_seed(seed)
    held = []
    for c in torch.unique(labels, sorted=True):
        idx = (labels == c).nonzero().flatten()
        held.append(idx[torch.randperm(len(idx), generator=g)][:round(fraction * len(idx))])
    test = torch.cat(held).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[test] = False
    return keep.nonzero().flatten(), test


def labelled_data(data_cfg, seed: int = DEFAULT_SEED) -> LabelledData:
    """The training and held-out images of the data set ``data_cfg`` names: the official test
    split where there is one (Fashion-MNIST's t10k), else a seeded 20 % of the training images."""
    x, y = load_labelled(data_cfg, "train")  # DataError for a set without labels
    if "test" in labelled_splits(data_cfg):
        tx, ty = load_labelled(data_cfg, "test")
        return LabelledData(x, y, tx, ty, f"the {data_cfg.dataset} test split ({len(ty)} images)")
    train, test = held_out_split(y, seed)
    return LabelledData(x[train], y[train], x[test], y[test],
                        f"a held-out {HELD_OUT:.0%} of the {data_cfg.dataset} training images ({len(test)}, seed {seed})")


def classifier_key(dataset: str, arch: dict, recipe: Recipe, seed: int, data: LabelledData) -> str:
    """sha256 of everything the weights follow from: the code version, data set, seed,
    architecture, recipe, and the training and held-out images and labels (their bytes)."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": CLASSIFIER_VERSION, "dataset": dataset, "seed": int(seed),
                         "architecture": arch, "recipe": asdict(recipe)}, sort_keys=True).encode())
    for t in (data.train_x, data.train_y, data.test_x, data.test_y):
        arr = t.contiguous().numpy()
        arr = arr.astype("<i8") if arr.dtype == np.int64 else arr  # one byte order everywhere
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def cache_dir() -> Path:
    """``$S2DM_CACHE``, else ``~/.cache/s2dm``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "s2dm"


def classifier_path(dataset: str, sha256: str) -> Path:
    return cache_dir() / f"classifier-{dataset}-{sha256[:12]}.pt"


def state_sha256(state: dict) -> str:
    """sha256 of a state dict's names, shapes and float32 bytes: a fingerprint of the weights
    that also catches a cache file damaged inside a tensor."""
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        arr = t.detach().cpu().contiguous().numpy()
        h.update(f"{name}{arr.dtype.str}{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- training

def accuracy(model: SmallCNN, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Fraction of uint8 images ``x`` the model labels as ``y``."""
    model.eval()
    right = 0
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            right += int((model(from_uint8(x[i:i + batch_size])).argmax(1) == y[i:i + batch_size]).sum())
    return right / max(1, len(x))


def train_classifier(data: LabelledData, arch: dict, recipe: Recipe, seed: int) -> Tuple[dict, float]:
    """Train a ``SmallCNN`` on ``data`` → (state dict, held-out accuracy). On the CPU in one
    thread with a seeded initialisation and data order: the same inputs give bit-identical
    weights. The global RNG and thread count are left as they were."""
    n, bs = len(data.train_y), recipe.batch_size
    total = max(1, round(recipe.epochs * math.ceil(n / bs)))
    with one_thread(), torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # the CPU generator only: init draws from it
        model = SmallCNN(**arch)
        order_gen = torch.Generator().manual_seed(seed + 1)
        opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=total, pct_start=0.15)
        model.train()
        step = 0
        while step < total:
            order = torch.randperm(n, generator=order_gen)
            for i in range(0, n, bs):
                if step == total:
                    break
                j = order[i:i + bs]
                loss = F.cross_entropy(model(from_uint8(data.train_x[j])), data.train_y[j])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
        if not math.isfinite(loss.item()):
            raise MetricError(f"training the FD-cnn classifier diverged (loss {loss.item()})")
        acc = accuracy(model, data.test_x, data.test_y)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, acc


# ---------------------------------------------------------------- the classifier, loaded

@dataclass
class Classifier:
    """A trained classifier and what made it; ``features`` maps uint8 images to float64 (B, D)."""

    model: SmallCNN
    path: Path
    sha256: str  # classifier_key(): data, version, seed, architecture, recipe
    dataset: str
    image_size: int
    channels: int
    dim: int
    seed: int
    accuracy: float
    accuracy_on: str
    weights_sha256: str  # state_sha256() of the weights

    def to(self, device) -> "Classifier":
        self.model.to(device)
        return self

    def check_shape(self, shape) -> None:
        """A MetricError unless images of ``shape`` (C, H, W) are what this classifier takes."""
        want = (self.channels, self.image_size, self.image_size)
        if tuple(shape) != want:
            raise MetricError(f"the FD-cnn classifier {self.path} takes {'x'.join(map(str, want))} images "
                              f"({self.dataset}); these are {'x'.join(map(str, shape))}")

    def features(self, x: torch.Tensor) -> np.ndarray:
        """uint8 (B, C, H, W) → float64 (B, D): the penultimate layer before its ReLU, inputs
        mapped to [-1, 1] as in training."""
        self.check_shape(x.shape[1:])
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            f = self.model.features(from_uint8(x).to(device))
        return f.cpu().double().numpy()


_FIELDS = ("state_dict", "architecture", "sha256", "dataset", "image_size", "seed", "version",
           "accuracy", "accuracy_on", "weights_sha256")


def load_classifier(path: PathLike, expect_sha256: Optional[str] = None) -> Classifier:
    """Read a classifier file (eval mode, CPU); a MetricError naming the file when it is missing,
    unreadable, damaged, or (``expect_sha256``) another classifier."""
    path = Path(path)
    if not path.is_file():
        raise MetricError(f"classifier file not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip, pickle and torch errors come in many types
        raise MetricError(f"cannot read the classifier {path} ({type(exc).__name__})") from None
    if not isinstance(blob, dict) or blob.get("kind") != FILE_KIND or any(k not in blob for k in _FIELDS):
        raise MetricError(f"{path} is not an s2dm FD-cnn classifier file")
    if expect_sha256 is not None and blob["sha256"] != expect_sha256:
        raise MetricError(f"{path} holds classifier {blob['sha256'][:12]}, not {expect_sha256[:12]}")
    if state_sha256(blob["state_dict"]) != blob["weights_sha256"]:
        raise MetricError(f"the classifier {path} is damaged: its weights do not match their recorded sha256")
    arch = blob["architecture"]
    try:
        model = SmallCNN(**arch)
        model.load_state_dict(blob["state_dict"])
    except (TypeError, RuntimeError) as exc:
        raise MetricError(f"{path}: the weights do not fit the recorded architecture "
                          f"({str(exc).splitlines()[0]})") from None
    return Classifier(model.eval(), path, blob["sha256"], blob["dataset"], int(arch["image_size"]),
                      int(arch["channels"]), int(arch["dim"]), int(blob["seed"]), float(blob["accuracy"]),
                      blob["accuracy_on"], blob["weights_sha256"])


def ensure_classifier(data_cfg, seed: int = DEFAULT_SEED) -> Path:
    """The cached classifier file of the data set ``data_cfg`` names (at its image size),
    trained and written first when it is not there or is damaged."""
    data = labelled_data(data_cfg, seed)
    name = data_cfg.dataset
    arch = architecture(data.train_x.shape[1], data.train_x.shape[-1])
    recipe = RECIPES[name]
    key = classifier_key(name, arch, recipe, seed, data)
    path = classifier_path(name, key)
    if path.exists():
        try:
            load_classifier(path, key)
            return path
        except MetricError as exc:
            note(f"{exc}; training it again")
    note(f"training the FD-cnn classifier of {name} {arch['image_size']}x{arch['image_size']} "
         f"({len(data.train_y)} images, seed {seed}) once, into {path}")
    start = time.perf_counter()
    state, acc = train_classifier(data, arch, recipe, seed)
    blob = {"kind": FILE_KIND, "state_dict": state, "architecture": arch, "sha256": key, "dataset": name,
            "image_size": arch["image_size"], "seed": int(seed), "version": CLASSIFIER_VERSION,
            "recipe": asdict(recipe), "accuracy": float(acc), "accuracy_on": data.test_name,
            "weights_sha256": state_sha256(state), "train_seconds": time.perf_counter() - start,
            "torch_version": str(torch.__version__)}
    try:
        atomic_torch_save(blob, path)
    except OSError as exc:
        raise MetricError(f"cannot write the classifier {path}: {exc.strerror}; set {CACHE_ENV} to a "
                          "writable folder") from None
    note(f"FD-cnn classifier trained in {blob['train_seconds']:.0f} s: held-out accuracy {acc:.2%} on "
         f"{data.test_name}")
    return path


def find_classifier(sha256: str, recorded: Optional[PathLike], what: str) -> Path:
    """The classifier file whose hash is ``sha256`` (statistics ``what`` were made with it): its
    ``recorded`` path, else the cache; else a MetricError saying how to rebuild it."""
    candidates = [Path(recorded)] if recorded else []
    folder = cache_dir()
    if folder.is_dir():
        candidates += sorted(folder.glob(f"classifier-*-{sha256[:12]}.pt"))
    for path in candidates:
        if path.is_file():
            try:
                load_classifier(path, sha256)
                return path
            except MetricError:
                continue  # another classifier at the recorded path, or a damaged copy
    raise MetricError(f"the FD-cnn classifier {sha256[:12]} that made {what} is neither at "
                      f"{recorded or '(no path recorded)'} nor in {folder}; rebuild it (the same data set "
                      "gives the same classifier) by making cnn reference statistics of its config again "
                      "(s2dm fid ref)")
