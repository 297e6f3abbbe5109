"""Training data sets -> float32 tensors (C, H, W) in [-1, 1].

``load_dataset(cfg)`` reads ``cfg.dataset``, ``cfg.root``, ``cfg.image_size``,
``cfg.channels`` and ``cfg.download``. Nothing is downloaded unless ``download`` is true.
Items carry no random augmentation: the training loop flips with its own seeded generator,
so a run depends only on its seed.

Sizes: each set has a native size (digits 8, Fashion-MNIST 28, CIFAR10 32, CelebA 64 after
its crop). Another ``image_size`` resizes every image once, bilinear with antialiasing
(torch for in-memory sets, PIL for files), e.g. Fashion-MNIST 28 -> 32.

``load_labelled(cfg, split)`` gives the class labels of digits and Fashion-MNIST with their
uint8 images (the classifier behind FD-cnn trains on them); ``load_dataset`` stays label-free.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError, S2dmError
from ..util.images import from_uint8, load_folder, open_image, to_uint8
from .archives import CIFAR10_TRAIN, read_cifar10_train, read_idx, read_train_partition

DATASETS = ("digits", "fashion_mnist", "cifar10", "celeba", "folder")

# the sets whose images come with class labels (``load_labelled``: FD-cnn's classifier)
LABELLED = ("digits", "fashion_mnist")

# the sets ``data.download: true`` fetches (with torchvision); digits come with scikit-learn
DOWNLOADABLE = ("fashion_mnist", "cifar10")

# channels each named set has; "folder" takes what the config asks for (1 or 3)
NATIVE_CHANNELS = {"digits": 1, "fashion_mnist": 1, "cifar10": 3, "celeba": 3}

# Debian's dataset-fashion-mnist package; a module constant so tests can point it elsewhere.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
CIFAR10_TAR = "cifar-10-python.tar.gz"
CIFAR10_DIR = "cifar-10-batches-py"

# CelebA crop of the DDIM repo (datasets/__init__.py): Crop(x1=cy-64, x2=cy+64, y1=cx-64,
# y2=cx+64) with F.crop(img, top=x1, left=y1, h=128, w=128), i.e. the PIL box
# (cx-64, cy-64, cx+64, cy+64) = (25, 57, 153, 185) on the 178x218 aligned images, then
# Resize(image_size) (PIL bilinear).
CELEBA_CX, CELEBA_CY, CELEBA_HALF = 89, 121, 64
CELEBA_ALIGNED_SIZE = (178, 218)  # (width, height)
CELEBA_URL = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"


# ---------------------------------------------------------------- data set classes

class MemoryImages(Dataset):
    """Images held as integers (N, C, H, W) in [0, max_value]; items are float32 in [-1, 1].

    uint8 storage keeps CIFAR10 at 150 MB instead of 600 MB as float32.
    """

    def __init__(self, data: torch.Tensor, max_value: int = 255, name: str = ""):
        if data.ndim != 4 or data.dtype != torch.uint8:
            raise ValueError(f"expected uint8 (N, C, H, W), got {data.dtype} {tuple(data.shape)}")
        self.data = data.contiguous()
        self.max_value = max_value
        self.name = name

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, i) -> torch.Tensor:
        x = self.data[i]
        if self.max_value == 255:
            return from_uint8(x)
        return x.float() * (2.0 / self.max_value) - 1.0

    def uint8_images(self, limit: Optional[int] = None) -> torch.Tensor:
        """All (or the first ``limit``) images as uint8 (N, C, H, W) in [0, 255]."""
        x = self.data[:limit]
        if self.max_value == 255:
            return x.clone()
        return to_uint8(x.float() * (2.0 / self.max_value) - 1.0)


class CelebAImages(Dataset):
    """CelebA aligned JPEGs, decoded per item (202k files do not belong in memory)."""

    def __init__(self, paths: Sequence[Path], image_size: int):
        self.paths = list(paths)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def load_uint8(self, i: int) -> np.ndarray:
        """Image ``i`` cropped and resized, uint8 HWC."""
        path = self.paths[i]
        im = open_image(path).convert("RGB")
        if im.size != CELEBA_ALIGNED_SIZE:
            raise DataError(
                f"CelebA image {path} is {im.size[0]}x{im.size[1]}, expected the aligned "
                f"{CELEBA_ALIGNED_SIZE[0]}x{CELEBA_ALIGNED_SIZE[1]} (img_align_celeba)"
            )
        cx, cy, r = CELEBA_CX, CELEBA_CY, CELEBA_HALF
        im = im.crop((cx - r, cy - r, cx + r, cy + r))
        im = im.resize((self.image_size, self.image_size), resample=Image.BILINEAR)
        return np.array(im, dtype=np.uint8)  # a writable copy, safe for torch.from_numpy

    def __getitem__(self, i) -> torch.Tensor:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        return from_uint8(torch.from_numpy(self.load_uint8(i)).permute(2, 0, 1))


def dataset_tensor(ds: Dataset, limit: Optional[int] = None) -> torch.Tensor:
    """The first ``limit`` (default all) items of ``ds`` as uint8 (N, C, H, W), mapped the
    same way samples are saved (``to_uint8``): the reference images for statistics."""
    if hasattr(ds, "uint8_images"):
        return ds.uint8_images(limit)
    n = len(ds) if limit is None else min(limit, len(ds))
    if n == 0:
        raise ValueError("dataset_tensor: empty data set")
    first = to_uint8(ds[0])
    out = torch.empty((n, *first.shape), dtype=torch.uint8)
    out[0] = first
    for i in range(1, n):
        out[i] = to_uint8(ds[i])
    return out


def loader_batches(loader: Iterable):
    """The batches of a DataLoader. A user error (a CelebA file that does not decode) raised
    in a worker process reaches the caller re-raised by torch, with the worker's whole
    traceback in its message; it is given back its own one line."""
    batches = iter(loader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except S2dmError as exc:
            text = str(exc)
            if not (text.startswith("Caught ") and "\nOriginal Traceback" in text):
                raise
            last = text.rstrip().splitlines()[-1]  # "s2dm.errors.DataError: cannot decode image ..."
            raise exc.retold(last.split(": ", 1)[-1]) from None
        yield batch


# ---------------------------------------------------------------- entry point

def load_dataset(cfg) -> Dataset:
    """Build the training set named by ``cfg.dataset``; items are float32 (C, H, W) in [-1, 1]."""
    name, size, channels, root, download = _checked(cfg)
    if name == "digits":
        ds = _digits(size)
    elif name == "fashion_mnist":
        ds = _fashion_mnist(root, size, download)
    elif name == "cifar10":
        ds = _cifar10(root, size, download)
    elif name == "celeba":
        ds = _celeba(root, size)
    else:
        ds = _folder(root, size, channels)
    if len(ds) == 0:  # a file with a valid header and no images
        raise DataError(f"the {name} data set{f' in {root}' if root else ''} holds no images")
    return ds


def _checked(cfg) -> tuple:
    """(dataset, image_size, channels, root, download) of a data config, checked."""
    name = cfg.dataset
    if name not in DATASETS:
        raise ConfigError(f"unknown data.dataset {name!r}; choose one of: {', '.join(DATASETS)}", key="data.dataset")
    size, channels = cfg.image_size, cfg.channels
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ConfigError(f"data.image_size must be a positive integer, not {size!r}", key="data.image_size")
    if name in NATIVE_CHANNELS and channels != NATIVE_CHANNELS[name]:
        want = NATIVE_CHANNELS[name]
        raise ConfigError(
            f"data.dataset {name} has {want} channel{'s' if want > 1 else ''} but "
            f"data.channels is {channels}; set data.channels: {want}", key="data.channels"
        )
    root = getattr(cfg, "root", None)
    root = Path(root).expanduser() if root not in (None, "") else None
    download = bool(getattr(cfg, "download", False))
    if download and name not in DOWNLOADABLE + ("digits",):  # nothing to fetch: say so before a not-found error
        what = (f"CelebA: download img_align_celeba.zip from {CELEBA_URL} and unzip it into data.root"
                if name == "celeba" else "an image folder: data.root is the folder itself")
        raise ConfigError(f"data.download: true fetches {' and '.join(DOWNLOADABLE)} only, not {what}; "
                          "set data.download: false", key="data.download")
    return name, size, channels, root, download


# ---------------------------------------------------------------- labelled images

def labelled_splits(cfg) -> Tuple[str, ...]:
    """The labelled splits ``load_labelled`` can read for this data config: ("train",) or
    ("train", "test"); () for a data set without labels. Only looks for files."""
    name, _, _, root, _ = _checked(cfg)
    if name == "digits":
        return ("train",)  # scikit-learn's digits have no official test split
    if name != "fashion_mnist":
        return ()
    path = _find_fashion(_fashion_folders(root))
    if path is None:
        return ()
    test = _beside(path, FASHION_TEST_IMAGES) and _beside(path, FASHION_TEST_LABELS)
    return ("train", "test") if test else ("train",)


def check_labelled(dataset: str, key: str = "data.dataset", use: str = "FD-cnn") -> None:
    """DataError unless ``dataset`` comes with class labels s2dm reads; ``use``: what needs them."""
    if dataset not in LABELLED:
        raise DataError(f"{key}: {use} needs a labelled data set ({', '.join(LABELLED)}); {dataset} has no "
                        "class labels s2dm can read", key=key)


def load_labelled(cfg, split: str = "train") -> Tuple[torch.Tensor, torch.Tensor]:
    """Labelled images of ``cfg.dataset`` (digits, fashion_mnist): uint8 (N, C, H, W) at
    ``cfg.image_size``, mapped as ``dataset_tensor`` maps ``load_dataset``'s items (the
    training split gives those very images, in that order), and int64 class labels (N,).

    ``split``: "train", or "test" (Fashion-MNIST's t10k files beside the training files;
    digits has none). Labels let s2dm train the small classifier whose features FD-cnn uses.
    """
    name, size, _, root, download = _checked(cfg)
    if split not in ("train", "test"):
        raise DataError(f"split must be train or test, not {split!r}", key="split")
    check_labelled(name)
    if name == "digits":
        if split == "test":
            raise DataError("data.dataset digits has no test split (scikit-learn's 1,797 images are "
                            "all training images); hold some out instead", key="split")
        return _digits(size).uint8_images(), _digits_labels()
    return _fashion_labelled(root, size, download, split)


def _digits_labels() -> torch.Tensor:
    from sklearn.datasets import load_digits  # CLI start-up time: sklearn takes ~1 s; only digits needs it

    return torch.from_numpy(load_digits().target.astype(np.int64))


def _beside(images: Path, stem: str) -> Optional[Path]:
    """The file ``stem`` (plain or .gz) in the folder of ``images``, or None."""
    for fname in (stem, stem + ".gz"):
        if (images.parent / fname).is_file():
            return images.parent / fname
    return None


def _read_labels(path: Path, n: int) -> torch.Tensor:
    """An idx label file of ``n`` labels 0..9 as int64."""
    labels = read_idx(path)
    if labels.shape != (n,):
        raise DataError(f"{path} holds labels of shape {labels.shape} but its images number {n}")
    if labels.size and int(labels.max()) > 9:
        raise DataError(f"{path} holds label {int(labels.max())}; Fashion-MNIST labels are 0..9")
    return torch.from_numpy(labels.astype(np.int64))


def _fashion_labelled(root: Optional[Path], size: int, download: bool, split: str):
    """Fashion-MNIST images and labels: the train split as ``_fashion_mnist`` reads it, or the
    t10k test split from the same folder."""
    train = _fashion_mnist(root, size, download)
    images_path = _find_fashion(_fashion_folders(root))
    if split == "train":
        labels = _beside(images_path, FASHION_TRAIN_LABELS)
        if labels is None:
            raise DataError(f"Fashion-MNIST labels not found: no {FASHION_TRAIN_LABELS}[.gz] beside {images_path}")
        return train.uint8_images(), _read_labels(labels, len(train))
    images, labels = _beside(images_path, FASHION_TEST_IMAGES), _beside(images_path, FASHION_TEST_LABELS)
    if images is None or labels is None:
        missing = FASHION_TEST_IMAGES if images is None else FASHION_TEST_LABELS
        raise DataError(f"Fashion-MNIST test split not found: no {missing}[.gz] beside {images_path}")
    data = read_idx(images)
    if data.ndim != 3:
        raise DataError(f"{images} should hold (N, 28, 28) images but has shape {data.shape}")
    return _memory_set(data[:, None], size, "fashion_mnist").uint8_images(), _read_labels(labels, len(data))


def _resize_batch(x: torch.Tensor, size: int, max_value: int = 255) -> torch.Tensor:
    """Resize uint8 (N, C, H, W) in [0, max_value] to size x size, returned in [0, 255].

    Bilinear with antialias (close to PIL's resize); chunked to bound float memory.
    """
    out = torch.empty((x.shape[0], x.shape[1], size, size), dtype=torch.uint8)
    scale = 255.0 / max_value
    for s in range(0, x.shape[0], 4096):
        chunk = x[s:s + 4096].float() * scale
        y = F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)
        out[s:s + 4096] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _memory_set(data: np.ndarray, size: int, name: str, max_value: int = 255) -> MemoryImages:
    """uint8 (N, C, H, W) -> MemoryImages, resized if ``size`` is not the native size."""
    x = torch.from_numpy(np.ascontiguousarray(data))
    if x.shape[-1] != size or x.shape[-2] != size:
        return MemoryImages(_resize_batch(x, size, max_value), 255, name)
    return MemoryImages(x, max_value, name)


# ---------------------------------------------------------------- digits

def _digits(size: int) -> MemoryImages:
    """scikit-learn's bundled 8x8 digits (values 0..16): v/16 mapped to [-1, 1].

    At image_size 8 the 17 levels are kept exactly; other sizes are resized once (and so
    quantised to 256 levels).
    """
    from sklearn.datasets import load_digits  # CLI start-up time: sklearn takes ~1 s; only digits needs it

    images = load_digits().images  # (1797, 8, 8) float64 holding integers 0..16
    data = images.astype(np.uint8)[:, None]
    return _memory_set(data, size, "digits", max_value=16)


# ---------------------------------------------------------------- Fashion-MNIST

FASHION_TRAIN_IMAGES = "train-images-idx3-ubyte"
FASHION_TRAIN_LABELS = "train-labels-idx1-ubyte"
FASHION_TEST_IMAGES = "t10k-images-idx3-ubyte"
FASHION_TEST_LABELS = "t10k-labels-idx1-ubyte"


def _find_fashion(folders: Sequence[Path]) -> Optional[Path]:
    for folder in folders:
        for fname in (FASHION_TRAIN_IMAGES, FASHION_TRAIN_IMAGES + ".gz"):
            if (folder / fname).is_file():
                return folder / fname
    return None


def _fashion_folders(root: Optional[Path]) -> list:
    """Where Fashion-MNIST's files may be, in order: root's torchvision layout, root, Debian's."""
    folders = []
    if root is not None:
        folders += [root / "FashionMNIST" / "raw", root]
    folders.append(DEBIAN_FASHION_MNIST)
    return folders


def _fashion_mnist(root: Optional[Path], size: int, download: bool) -> MemoryImages:
    """Fashion-MNIST train split (60k, 28x28), from root, then Debian's package folder."""
    folders = _fashion_folders(root)
    path = _find_fashion(folders)
    if path is None and download:
        if root is None:
            raise ConfigError("data.download is true but data.root is not set; set data.root "
                              "to the folder to download Fashion-MNIST into", key="data.root")
        _torchvision_download("FashionMNIST", root)
        path = _find_fashion(folders)
    if path is None:
        looked = ", ".join(str(f) for f in folders)
        raise DataError(
            f"Fashion-MNIST not found: looked for {FASHION_TRAIN_IMAGES}[.gz] in {looked}; "
            "install Debian's dataset-fashion-mnist package, put the files in data.root, "
            "or set data.download: true"
        )
    images = read_idx(path)
    if images.ndim != 3:
        raise DataError(f"{path} should hold (N, 28, 28) images but has shape {images.shape}")
    return _memory_set(images[:, None], size, "fashion_mnist")


def _torchvision_download(cls_name: str, root: Path) -> None:
    """Download a training set with torchvision (only ever called with data.download: true)."""
    import torchvision.datasets as tvd  # CLI start-up time: ~1 s to import; only downloads need it

    try:
        getattr(tvd, cls_name)(str(root), train=True, download=True)
    except Exception as e:  # network errors come in many types; all are the user's to fix
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"downloading {cls_name} into {root} failed: {msg}") from None


# ---------------------------------------------------------------- CIFAR10

def _cifar_source(root: Path) -> Optional[Path]:
    """Where the CIFAR10 train batches are under root (archive or extracted folder)."""
    if root.is_file() and root.name.endswith(".tar.gz"):
        return root
    for cand in (root / CIFAR10_DIR, root):
        if (cand / CIFAR10_TRAIN[0]).is_file():
            return cand
    if (root / CIFAR10_TAR).is_file():
        return root / CIFAR10_TAR
    return None


def _cifar10(root: Optional[Path], size: int, download: bool) -> MemoryImages:
    """CIFAR10 train split (50k, 32x32x3)."""
    if root is None:
        raise DataError(
            f"CIFAR10 needs data.root: a folder holding {CIFAR10_TAR} or {CIFAR10_DIR}/ "
            f"(download it from {CIFAR10_URL}), or set data.root and data.download: true"
        )
    source = _cifar_source(root)
    if source is None and download:
        _torchvision_download("CIFAR10", root)
        source = _cifar_source(root)
    if source is None:
        raise DataError(
            f"CIFAR10 not found: looked for {root / CIFAR10_TAR} and {root / CIFAR10_DIR}; "
            f"download {CIFAR10_TAR} from {CIFAR10_URL} into {root}, or set data.download: true"
        )
    data = read_cifar10_train(source)
    return _memory_set(data, size, "cifar10")


# ---------------------------------------------------------------- CelebA

def _jpeg_names(folder: Path) -> list[str]:
    # scandir, not a recursive walk: img_align_celeba is flat and holds 202,599 files.
    with os.scandir(folder) as it:
        return sorted(e.name for e in it
                      if e.name.lower().endswith((".jpg", ".jpeg")) and e.is_file())


def _train_partition(files: list[str], folder: Path, root: Path) -> list[str]:
    """Keep the train split (partition 0) when list_eval_partition.{txt,csv} sits next to
    the image folder or in root, as torchvision's CelebA(split="train"), which the DDIM repo
    trains on, does. Without that file every image is used."""
    parts = [d / f"list_eval_partition.{ext}" for d in dict.fromkeys((folder.parent, root))
             for ext in ("txt", "csv")]
    part = next((p for p in parts if p.is_file()), None)
    if part is None:
        return files
    train = read_train_partition(part)
    kept = [f for f in files if f in train]
    if not kept:
        raise DataError(f"{part} lists no train (partition 0) image found in {folder}")
    return kept


def _celeba(root: Optional[Path], size: int) -> CelebAImages:
    """CelebA aligned faces: DDIM's 128x128 centre crop, resized to image_size, lazily."""
    if root is None:
        raise DataError(
            "CelebA needs data.root: the img_align_celeba folder or a folder containing it "
            f"(download img_align_celeba.zip from {CELEBA_URL} and unzip it)"
        )
    candidates = [root, root / "img_align_celeba", root / "celeba" / "img_align_celeba",
                  root / "img_align_celeba" / "img_align_celeba"]  # the last: Kaggle's zip
    for folder in candidates:
        if folder.is_dir():
            files = _jpeg_names(folder)
            if files:
                break
    else:
        raise DataError(
            f"CelebA not found: no .jpg files in {', '.join(str(c) for c in candidates)}; "
            f"download img_align_celeba.zip from {CELEBA_URL} and unzip it into {root}"
        )
    files = _train_partition(files, folder, root)
    ds = CelebAImages([folder / f for f in files], size)
    ds.load_uint8(0)  # fail now, not mid-training, when the files are not aligned CelebA
    return ds


# ---------------------------------------------------------------- folder

def _folder(root: Optional[Path], size: int, channels: int) -> MemoryImages:
    """Any folder of square images of exactly image_size, converted to ``channels``; held in
    memory as uint8. A different size is an error rather than a silent resize: a folder is
    often a set of samples or a prepared data set, whose size the user should know."""
    if root is None:
        raise ConfigError("data.dataset folder needs data.root: the folder of images", key="data.root")
    if channels not in (1, 3):
        raise ConfigError(f"data.channels must be 1 or 3 for an image folder, not {channels}", key="data.channels")
    arr = load_folder(root, channels=channels, size=size)  # (N, H, W, C)
    return MemoryImages(torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous(), 255, "folder")
