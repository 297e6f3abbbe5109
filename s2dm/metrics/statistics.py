"""Fréchet statistics: feature-kind names and labels (FID vs FD-pixels vs FD-cnn), the
float64 ``Stats`` of a set of feature vectors (saved as pytorch-fid-compatible ``.npz``), and
the running moments that accumulate them batch by batch."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np

from ..errors import MetricError
from ..util.dist import note
from ..util.fileio import atomic_write, writing
from ..io.config import INCEPTION_DIM, INCEPTION_DIMS
from .inception import check_dims

# The feature kinds, the one list (``feature_kind`` checks a name against it; the CLI leaves
# --features to it, since importing this module costs pytorch-fid's start-up): pytorch-fid's
# Inception (FID), raw pixels (FD-pixels), the penultimate layer of s2dm's own small classifier
# of the data set (FD-cnn, metrics/classifier.py).
FEATURES = ("inception", "pixels", "cnn")
PLAIN_KINDS = ("pixels", "cnn")  # kinds whose name has no dimension
FULL_N = 50_000  # the paper protocol; fewer samples get a labelled metric (FID-10k)
PathLike = Union[str, os.PathLike]

# ---------------------------------------------------------------- names and labels

def feature_kind(features: str, dims: int = INCEPTION_DIM) -> str:
    """``"inception-2048"`` / ``"inception-64"`` / ``"pixels"`` / ``"cnn"``: the kind stored in
    stats (``dims`` matters for Inception only)."""
    if features in PLAIN_KINDS:
        return features
    if features != "inception":
        raise MetricError(f"features must be one of {', '.join(FEATURES)}, not {features!r}", key="features")
    return f"inception-{check_dims(dims)}"


def parse_kind(kind: str) -> Tuple[str, int]:
    """Inverse of ``feature_kind``: ``"inception-768"`` → ("inception", 768), ``"cnn"`` → ("cnn", 0)."""
    if kind in PLAIN_KINDS:
        return kind, 0
    if kind.startswith("inception-") and kind[len("inception-"):].isdigit():
        return "inception", int(kind[len("inception-"):])
    raise MetricError(f"unknown feature kind {kind!r}")


def metric_name(kind: str) -> str:
    """FID for Inception pool3 (2048-d) only; everything else is a labelled Fréchet distance
    (``FD-pixels``, ``FD-cnn``, ``FD-inception768``)."""
    if kind in PLAIN_KINDS:
        return f"FD-{kind}"
    if kind == f"inception-{INCEPTION_DIM}":
        return "FID"
    return f"FD-{kind.replace('-', '')}"  # FD-inception768


def _count_text(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def metric_label(metric: str, n: Optional[int]) -> str:
    """``FID`` at N >= 50,000 (the paper protocol), else ``FID-10k``; every other metric with its
    N at any N (``FD-pixels-32``, ``FD-cnn-60k``): no protocol makes its bare name mean an N.
    ``FID (N unknown)`` for statistics that do not record their N (a plain pytorch-fid file),
    which must not pass for the 50k protocol."""
    if n is None:
        return f"{metric} (N unknown)"
    if n >= FULL_N and metric == "FID":
        return metric
    return f"{metric}-{_count_text(n)}"


# ---------------------------------------------------------------- statistics

@dataclass
class Stats:
    """Mean and covariance (float64) of N feature vectors, and what they were made from."""

    mu: np.ndarray
    sigma: np.ndarray
    n: Optional[int]  # None: a plain pytorch-fid file that does not record it
    features: str  # feature_kind(): "inception-2048" | "pixels" | "cnn" | ...
    # Inception: the weights file's sha256; cnn: the classifier's hash (classifier_key: its data,
    # code version, seed, architecture), which finds it in the cache; None for pixels / unknown
    weights_sha256: Optional[str] = None
    source: str = ""
    shape: Optional[Tuple[int, ...]] = None  # pixels, cnn: the images' (C, H, W)
    path: Optional[str] = None  # the .npz it was loaded from
    weights_path: Optional[str] = None  # the Inception weights / classifier file used
    classifier_accuracy: Optional[float] = None  # cnn: the classifier's held-out accuracy

    @property
    def metric(self) -> str:
        return metric_name(self.features)

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    def describe(self) -> str:
        what = f"N={self.n}" if self.n is not None else "N unknown"
        if self.features == "pixels" and self.shape:
            what += f", pixels {'x'.join(map(str, self.shape))}"
        elif self.features == "cnn":
            what += f", cnn features of classifier {(self.weights_sha256 or 'unknown')[:12]}"
            if self.classifier_accuracy is not None:
                what += f" (held-out accuracy {self.classifier_accuracy:.1%})"
        else:
            what += f", {self.features}"
        return what

    def save(self, path: PathLike) -> Path:
        """Write an ``.npz`` pytorch-fid can read (``mu``, ``sigma``) plus our metadata;
        atomically (temp file + rename)."""
        path = Path(path)
        if path.suffix != ".npz":
            raise MetricError(f"statistics file must end in .npz: {path}")
        arrays = dict(
            mu=self.mu.astype(np.float64), sigma=self.sigma.astype(np.float64),
            n=np.int64(-1 if self.n is None else self.n), features=np.str_(self.features),
            metric=np.str_(self.metric), weights_sha256=np.str_(self.weights_sha256 or ""),
            source=np.str_(self.source), shape=np.asarray(self.shape or (), dtype=np.int64),
            pixel_range=np.str_("0,1" if self.features == "pixels" else ""),
            weights_path=np.str_(self.weights_path or ""),
        )
        if self.classifier_accuracy is not None:
            arrays["classifier_accuracy"] = np.float64(self.classifier_accuracy)
        with writing(path, MetricError):
            atomic_write(path, lambda f: np.savez(f, **arrays))
        return path

    @classmethod
    def load(cls, path: PathLike) -> "Stats":
        """Read an ``.npz`` written by s2dm or by pytorch-fid (``mu``/``sigma`` only: taken as
        Inception features of the dimension ``mu`` has)."""
        path = Path(path)
        if not path.is_file():
            raise MetricError(f"statistics file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as f:
                data = {k: f[k] for k in f.files}
        except Exception as exc:  # zipfile/numpy raise several types for a bad file
            raise MetricError(f"cannot read statistics {path}: not an .npz file ({type(exc).__name__})") from None
        missing = [k for k in ("mu", "sigma") if k not in data]
        if missing:
            raise MetricError(f"{path} has no {' or '.join(missing)} array; it is not a statistics file "
                              "(make one with `s2dm fid ref`)")
        mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise MetricError(f"{path}: mu has shape {mu.shape} and sigma {sigma.shape}; expected (D,) and (D, D)")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise MetricError(f"{path}: mu/sigma contain NaN or infinite values")
        if "features" in data:
            features = str(data["features"])
            parse_kind(features)
        elif mu.shape[0] in INCEPTION_DIMS:  # a plain pytorch-fid file
            features = f"inception-{mu.shape[0]}"
            note(f"{path} records no feature kind; taking it as pytorch-fid Inception "
                  f"{mu.shape[0]}-d statistics")
        else:
            raise MetricError(f"{path}: {mu.shape[0]}-d statistics without a 'features' entry; cannot tell "
                              "what features they hold")
        n = int(data["n"]) if "n" in data and int(data["n"]) >= 0 else None
        if n is not None and n < 2:
            raise MetricError(f"{path} was computed from {n} image(s); statistics need at least 2")
        sha = str(data["weights_sha256"]) if "weights_sha256" in data else ""
        shape = tuple(int(s) for s in data["shape"]) if "shape" in data and data["shape"].size else None
        source = str(data["source"]) if "source" in data else ""
        wpath = str(data["weights_path"]) if "weights_path" in data else ""
        acc = float(data["classifier_accuracy"]) if "classifier_accuracy" in data else None
        return cls(mu, sigma, n, features, sha or None, source or str(path), shape, str(path), wpath or None, acc)


class RunningMoments:
    """Mean and N-1 covariance accumulated batch by batch in float64, shifted by the first
    batch's mean (so large offsets do not cancel digits); memory O(D^2), not O(N D)."""

    def __init__(self):
        self.n = 0
        self.shift = None
        self.s = None
        self.ss = None

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] == 0:
            return
        if self.shift is None:
            self.shift = x.mean(axis=0)
            self.s = np.zeros(x.shape[1])
            self.ss = np.zeros((x.shape[1], x.shape[1]))
        y = x - self.shift
        self.s += y.sum(axis=0)
        self.ss += y.T @ y
        self.n += x.shape[0]

    def sums_about(self, shift: np.ndarray) -> Tuple[int, np.ndarray, np.ndarray]:
        """(n, Σy, Σyyᵀ) with y = x − ``shift`` instead of x − self.shift (exact algebra:
        y' = y + d, d = self.shift − shift), to add the moments of several ranks."""
        d = self.shift - np.asarray(shift, dtype=np.float64)
        if not d.any():
            return self.n, self.s.copy(), self.ss.copy()
        ss = self.ss + np.outer(d, self.s) + np.outer(self.s, d) + self.n * np.outer(d, d)
        return self.n, self.s + self.n * d, ss

    def finalize(self) -> Tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise MetricError(f"statistics need at least 2 images, got {self.n}")
        m = self.s / self.n
        sigma = (self.ss - self.n * np.outer(m, m)) / (self.n - 1)
        return self.shift + m, (sigma + sigma.T) / 2
