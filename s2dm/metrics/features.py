"""Features of images for Fréchet distances, accumulated into float64 statistics: the three
kinds (``inception``, ``pixels``, ``cnn``; see ``fid.py`` for what each is and how it is
labelled), from folders, data sets or tensors in memory, batch by batch; under torchrun each
rank takes whole batches and the moments are summed across ranks in float64.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import DataError, MetricError
from ..io.config import INCEPTION_DIM
from ..util import dist
from ..util.dist import pick_device
from ..util.fileio import sha256_file
from .classifier import Classifier, ensure_classifier, load_classifier
from .inception import load_inception, resolve_inception_weights
from .inputs import FileImages, ImageSet, collate_images, scan_images
from .statistics import RunningMoments, Stats, feature_kind, metric_name, parse_kind

PathLike = Union[str, os.PathLike]


class FeatureExtractor:
    """Features for statistics: ``inception`` (pytorch-fid's network, loaded lazily),
    ``pixels``, or ``cnn`` (s2dm's classifier of a data set: ``data`` its ``DataConfig``, trained
    or found in the cache, or ``weights`` a classifier file). One instance serves many image
    sets (eval builds it once)."""

    def __init__(self, features: str = "inception", *, dims: int = INCEPTION_DIM, device: str = "auto",
                 batch_size: int = 50, num_workers: int = 0, weights: Optional[PathLike] = None,
                 allow_download: bool = False, progress: bool = True, data=None):
        self.kind = feature_kind(features, dims)
        self.features, self.dims = parse_kind(self.kind)
        if batch_size < 1:
            raise MetricError(f"batch_size must be at least 1, not {batch_size}", key="batch_size")
        if num_workers < 0:
            raise MetricError(f"num_workers must be >= 0, not {num_workers}", key="num_workers")
        self.device = pick_device(device)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.weights_arg, self.allow_download, self.progress = weights, allow_download, progress
        self.data = data
        self._model = None
        self.classifier: Optional[Classifier] = None
        self.weights_path: Optional[Path] = None
        self.weights_how: Optional[str] = None
        self.weights_sha256: Optional[str] = None

    @property
    def metric(self) -> str:
        return metric_name(self.kind)

    def load(self) -> None:
        """Resolve, hash and load the Inception weights or the classifier (no-op for pixels or
        when loaded)."""
        if self.features == "pixels" or self._model is not None:
            return
        if self.features == "cnn":
            self._load_classifier()
            return
        # Rank 0 finds (and may convert or download) the weights; then every rank loads them.
        path, how = dist.run0(lambda: resolve_inception_weights(self.weights_arg,
                                                                allow_download=self.allow_download))
        self.weights_sha256 = sha256_file(path)
        self._model = load_inception(path, self.dims).to(self.device)
        self.weights_path, self.weights_how = path, how

    def _load_classifier(self) -> None:
        """The classifier file: ``weights``, else the data set's, which rank 0 finds in the
        cache or trains (then writes) first; then every rank loads the file."""
        if self.weights_arg is not None:
            path, how = Path(self.weights_arg).expanduser(), "classifier file"
        elif self.data is not None:
            path, how = dist.run0(lambda: ensure_classifier(self.data)), "s2dm cache"
        else:
            raise MetricError("FD-cnn features need their classifier: a classifier file (weights=PATH), or the "
                              "labelled data set's config to train one on", key="weights")
        clf = load_classifier(path).to(self.device)
        self.classifier, self._model = clf, clf.model
        self.weights_path, self.weights_how, self.weights_sha256 = path, how, clf.sha256
        self.dims = clf.dim

    def _features(self, x: torch.Tensor) -> np.ndarray:
        """uint8 (B, C, H, W) → float64 (B, D)."""
        if self.features == "pixels":  # exact v / 255 in float64
            return (x.reshape(x.shape[0], -1).double() / 255.0).numpy()
        if self.features == "cnn":
            return self.classifier.features(x)
        x = x.float() / 255.0  # == torchvision ToTensor on the uint8 image (float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grayscale → RGB, as PIL's convert("RGB") replicates
        with torch.inference_mode():
            pred = self._model(x.to(self.device))[0]
            if pred.shape[2] != 1 or pred.shape[3] != 1:  # dims < 2048, as pytorch-fid does
                pred = torch.nn.functional.adaptive_avg_pool2d(pred, output_size=(1, 1))
        return pred.reshape(pred.shape[0], -1).cpu().double().numpy()

    def _run(self, batches: Iterable[torch.Tensor], total: int, desc: str) -> RunningMoments:
        self.load()
        moments = RunningMoments()
        world = dist.world_size()
        bar = tqdm(total=total, desc=desc if world == 1 else f"{desc} (rank 0 of {world})", unit="img",
                   dynamic_ncols=True, disable=not (self.progress and dist.is_main()))
        try:
            with dist.same_outcome():  # a bad file on one rank stops every rank with its message
                for batch in batches:
                    if isinstance(batch, str):
                        raise DataError(batch)  # a file that did not decode, or sizes that differ
                    moments.update(self._features(batch))
                    bar.update(batch.shape[0])
        finally:
            bar.close()
        return moments

    def _stats(self, moments: RunningMoments, source: str, shape) -> Stats:
        moments, shape = all_reduce_moments(moments, shape)
        mu, sigma = moments.finalize()
        inception, net = self.features == "inception", self.features != "pixels"
        return Stats(mu, sigma, moments.n, self.kind, self.weights_sha256 if net else None, source,
                     tuple(shape) if not inception else None,
                     weights_path=str(self.weights_path) if net else None,
                     classifier_accuracy=self.classifier.accuracy if self.classifier is not None else None)

    def _mode(self, images: ImageSet) -> str:
        """How files are decoded: "L" (one channel) for grayscale images under pixels and under
        a grayscale classifier, else "RGB"; colour images for a grayscale classifier are refused."""
        if self.features == "cnn":
            self.load()
            channels = 3 if self.classifier.channels == 3 else images.channels
            self.classifier.check_shape((channels, *images.size))
            return "L" if channels == 1 else "RGB"
        return "L" if self.features == "pixels" and images.gray else "RGB"

    def stats_of_images(self, images: ImageSet) -> Stats:
        """Statistics of validated image files (see ``scan_images``)."""
        mode = self._mode(images)
        a, b = batch_aligned_shard(len(images.files), self.batch_size)  # this rank's files
        loader = torch.utils.data.DataLoader(
            FileImages(images.files[a:b], mode), batch_size=self.batch_size, shuffle=False,
            num_workers=self.num_workers, collate_fn=collate_images)
        moments = self._run(loader, b - a, f"{self.metric} {Path(images.source).name or 'images'}")
        shape = (1 if mode == "L" else 3, *images.size)
        return self._stats(moments, images.source, shape)

    def stats_of_files(self, files: Sequence[PathLike], source: str = "") -> Stats:
        return self.stats_of_images(scan_images(files, source))

    def stats_of_uint8(self, batches: Iterable[torch.Tensor], total: int, source: str) -> Stats:
        """Statistics of uint8 (B, C, H, W) batches (a data set's images). Under torchrun each
        rank passes the batches of its own part (see ``batch_aligned_shard``)."""
        shape = []

        def checked():
            for b in batches:
                if b.dtype != torch.uint8 or b.ndim != 4 or b.shape[1] not in (1, 3):
                    raise ValueError(f"expected uint8 (B, C, H, W) with C in 1, 3, got {b.dtype} {tuple(b.shape)}")
                if not shape:
                    shape.extend(b.shape[1:])
                yield b

        moments = self._run(checked(), total, f"{self.metric} {source}")
        return self._stats(moments, source, shape)


# ---------------------------------------------------------------- several ranks

def batch_aligned_shard(n: int, batch_size: int) -> Tuple[int, int]:
    """[a, b): this rank's items of n, whole batches of ``batch_size`` each (the last batch of
    all may be short), so every rank's batches are batches one process would run."""
    n_batches = -(-n // batch_size)
    first, stop = dist.shard_bounds(n_batches)
    return min(n, first * batch_size), min(n, stop * batch_size)


def all_reduce_moments(moments: RunningMoments, shape=()) -> Tuple[RunningMoments, tuple]:
    """Every rank's moments summed in float64, about one common shift (the first non-empty
    rank's, so rank 0's sums are those one process accumulates); also the image shape, which
    a rank without images did not see. A plain process gets its arguments back."""
    if dist.world_size() == 1:
        return moments, shape
    seen = dist.all_gather_object((moments.n, moments.shift, tuple(shape)))
    donor = next((i for i, (n, _, _) in enumerate(seen) if n > 0), None)
    if donor is None:
        return moments, shape
    shift, dim = np.asarray(seen[donor][1], dtype=np.float64), len(seen[donor][1])
    n, s, ss = moments.sums_about(shift) if moments.n else (0, np.zeros(dim), np.zeros((dim, dim)))
    total = RunningMoments()
    total.shift = shift
    total.n = int(round(float(dist.all_reduce_sum([n])[0])))
    total.s = dist.all_reduce_sum(s)
    total.ss = dist.all_reduce_sum(ss)
    return total, tuple(seen[donor][2])
