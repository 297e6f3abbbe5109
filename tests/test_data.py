"""Tests for s2dm.io.data. Every data set except digits is written here, tiny, in its real
on-disk format (CIFAR10 pickles in a tar.gz, idx ubyte.gz, aligned CelebA JPEGs, PNGs)."""
import gzip
import io
import pickle
import struct
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from s2dm.errors import ConfigError, UserError
from s2dm.io import data
from s2dm.io.archives import read_idx
from s2dm.io.data import dataset_tensor, load_dataset
from s2dm.util.images import from_uint8, to_uint8


def cfg(dataset, root=None, image_size=8, channels=1, download=False):
    return SimpleNamespace(dataset=dataset, root=None if root is None else str(root),
                           image_size=image_size, channels=channels, download=download)


@pytest.fixture(autouse=True)
def no_debian_fashion(tmp_path, monkeypatch):
    # Keep a real /usr/share/datasets/fashion-mnist (if installed) out of every test.
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")


# ---------------------------------------------------------------- general

def test_unknown_dataset_lists_choices():
    with pytest.raises(UserError, match="unknown data.dataset 'mnist'.*digits.*cifar10.*folder"):
        load_dataset(cfg("mnist"))


def test_wrong_channels():
    with pytest.raises(UserError, match="digits has 1 channel but data.channels is 3"):
        load_dataset(cfg("digits", channels=3))
    with pytest.raises(UserError, match="cifar10 has 3 channels but data.channels is 1"):
        load_dataset(cfg("cifar10", channels=1))


def test_bad_image_size():
    with pytest.raises(UserError, match="image_size"):
        load_dataset(cfg("digits", image_size=0))


# ---------------------------------------------------------------- digits

def test_digits():
    from sklearn.datasets import load_digits

    ref = load_digits().images
    ds = load_dataset(cfg("digits"))
    assert len(ds) == 1797
    x = torch.stack([ds[i] for i in range(len(ds))])
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    # v/16 in [0, 1] -> [-1, 1]: v/8 - 1, exactly (17 levels kept)
    np.testing.assert_array_equal(x[:, 0].numpy(), (ref / 8.0 - 1.0).astype(np.float32))
    assert ref[0, 0, 2] == 5.0 and x[0, 0, 0, 2].item() == 5 / 8 - 1
    u = dataset_tensor(ds)
    assert u.shape == (1797, 1, 8, 8) and u.dtype == torch.uint8
    assert torch.equal(u, to_uint8(x))
    assert dataset_tensor(ds, limit=5).shape == (5, 1, 8, 8)


def test_digits_resized():
    ds = load_dataset(cfg("digits", image_size=16))
    x = ds[3]
    assert x.shape == (1, 16, 16)
    assert x.min() >= -1 and x.max() <= 1


# ---------------------------------------------------------------- CIFAR10

def _cifar_batches(n_per=2, seed=0):
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    batches = {}
    for k, name in enumerate(names):
        arr = rng.integers(0, 256, (n_per, 3072), dtype=np.uint8)
        if k == 0:
            arr[0] = 0
            arr[0, :1024] = 255  # first image: pure red (plane order R, G, B)
        batches[name] = {b"batch_label": name.encode(), b"labels": [k % 10] * n_per,
                         b"data": arr, b"filenames": [b"x.png"] * n_per}
    return batches


def _expected_train(batches):
    rows = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    return from_uint8(torch.from_numpy(rows.reshape(-1, 3, 32, 32)))


def _write_cifar_tar(root, batches):
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        for name, d in list(batches.items()) + [("batches.meta", {b"label_names": []})]:
            blob = pickle.dumps(d, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def _write_cifar_dir(folder, batches):
    folder.mkdir(parents=True, exist_ok=True)
    for name, d in batches.items():
        (folder / name).write_bytes(pickle.dumps(d))  # today's default protocol


def _all(ds):
    return torch.stack([ds[i] for i in range(len(ds))])


def test_cifar10_from_tar(tmp_path):
    batches = _cifar_batches()
    _write_cifar_tar(tmp_path, batches)
    ds = load_dataset(cfg("cifar10", tmp_path, image_size=32, channels=3))
    assert len(ds) == 10  # 5 train batches x 2; test_batch not used
    assert torch.equal(_all(ds), _expected_train(batches))
    red = ds[0]
    assert (red[0] == 1).all() and (red[1:] == -1).all()
    # raw pixels come back exactly
    assert torch.equal(dataset_tensor(ds)[3].reshape(-1),
                       torch.from_numpy(batches["data_batch_2"][b"data"][1]))


def test_cifar10_from_extracted_folder(tmp_path):
    batches = _cifar_batches(seed=1)
    _write_cifar_dir(tmp_path / "cifar-10-batches-py", batches)
    ds = load_dataset(cfg("cifar10", tmp_path, image_size=32, channels=3))
    assert torch.equal(_all(ds), _expected_train(batches))
    # root may also be the batches folder itself
    ds2 = load_dataset(cfg("cifar10", tmp_path / "cifar-10-batches-py", 32, 3))
    assert len(ds2) == 10


def _u(s):  # SHORT_BINSTRING: a Python 2 str
    return b"U" + bytes([len(s)]) + s


def _py2_batch_pickle(arr):
    """A batch pickled the way the official (Python 2, numpy 1.x) files are: str keys,
    numpy.core.multiarray globals, raw pixels as a py2 str. Hand-assembled opcodes."""
    raw = arr.tobytes()
    dtype = (b"cnumpy\ndtype\n" + _u(b"u1") + b"\x89\x88\x87R(K\x03" + _u(b"|")
             + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _u(b"b")
             + b"\x87R(K\x01K" + bytes([arr.shape[0]]) + b"M\x00\x0c\x86" + dtype + b"\x89T"
             + struct.pack("<I", len(raw)) + raw + b"tb")
    return b"\x80\x02}(" + _u(b"data") + array + _u(b"labels") + b"]u."


def test_cifar10_python2_pickles_and_resize(tmp_path, recwarn):
    batches = _cifar_batches()
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, d in batches.items():
        (folder / name).write_bytes(_py2_batch_pickle(d[b"data"]))
    ds = load_dataset(cfg("cifar10", tmp_path, image_size=32, channels=3))
    assert torch.equal(_all(ds), _expected_train(batches))
    assert not [w for w in recwarn if "numpy.core" in str(w.message)]
    ds16 = load_dataset(cfg("cifar10", tmp_path, image_size=16, channels=3))
    assert ds16[0].shape == (3, 16, 16)
    assert (ds16[0][0] == 1).all() and (ds16[0][1:] == -1).all()


def test_cifar10_missing(tmp_path):
    root = tmp_path / "nothing"
    msg = f"CIFAR10 not found: looked for {root}/cifar-10-python.tar.gz and {root}/cifar-10-batches-py"
    with pytest.raises(UserError, match=msg):
        load_dataset(cfg("cifar10", root, 32, 3))
    with pytest.raises(UserError, match="CIFAR10 needs data.root"):
        load_dataset(cfg("cifar10", None, 32, 3))


def test_cifar10_missing_batch_and_corrupt(tmp_path):
    batches = _cifar_batches()
    del batches["data_batch_4"]
    _write_cifar_dir(tmp_path / "cifar-10-batches-py", batches)
    with pytest.raises(UserError, match="lacks data_batch_4"):
        load_dataset(cfg("cifar10", tmp_path, 32, 3))
    (tmp_path / "cifar-10-batches-py").rename(tmp_path / "old")
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(UserError, match="cannot read .*cifar-10-python.tar.gz"):
        load_dataset(cfg("cifar10", tmp_path, 32, 3))


class _Evil:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def test_cifar10_refuses_code_in_pickles(tmp_path):
    batches = _cifar_batches()
    batches["data_batch_1"] = {b"data": _Evil()}
    _write_cifar_dir(tmp_path / "cifar-10-batches-py", batches)
    with pytest.raises(UserError, match="cannot read CIFAR10 batch .*data_batch_1.*builtins.eval"):
        load_dataset(cfg("cifar10", tmp_path, 32, 3))


# ---------------------------------------------------------------- Fashion-MNIST

def _idx_bytes(arr):
    header = bytes([0, 0, 0x08, arr.ndim]) + np.array(arr.shape, dtype=">i4").tobytes()
    return header + arr.astype(np.uint8).tobytes()


def _fashion_images(n=5, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)


def test_read_idx_reads_hand_built_files(tmp_path):
    """Files built byte by byte from the IDX spec: magic 0x00000803 (ubyte, 3 dims) for images,
    0x00000801 (ubyte, 1 dim) for labels, then each dim as a big-endian int32, then the data."""
    data = bytes(range(256)) * 3  # 2 x 3 x 128 = 768 values; 0x80 = 128 needs big-endian to read right
    images = b"\x00\x00\x08\x03" + b"\x00\x00\x00\x02" + b"\x00\x00\x00\x03" + b"\x00\x00\x00\x80" + data
    assert int.from_bytes(images[:4], "big") == 2051
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(images)
    arr = read_idx(p)
    assert arr.dtype == np.uint8 and arr.shape == (2, 3, 128)
    assert arr[0, 0, 0] == 0 and arr[0, 0, 127] == 127 and arr[0, 1, 0] == 128 and arr[0, 2, 0] == 0
    assert arr[1, 0, 0] == 128 and arr[1, 2, 127] == 255  # row-major: flat index 767 = 255
    labels = b"\x00\x00\x08\x01" + b"\x00\x00\x01\x2c" + bytes(i % 10 for i in range(300))  # 300 labels
    assert int.from_bytes(labels[:4], "big") == 2049
    g = tmp_path / "train-labels-idx1-ubyte.gz"
    g.write_bytes(gzip.compress(labels))
    lab = read_idx(g)
    assert lab.shape == (300,) and lab[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1] and lab[-1] == 9
    # the helper the other tests use writes exactly these bytes
    assert _idx_bytes(arr) == images and _idx_bytes(lab) == labels


def test_fashion_torchvision_layout_gz(tmp_path):
    imgs = _fashion_images()
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(imgs)))
    ds = load_dataset(cfg("fashion_mnist", tmp_path, image_size=28))
    assert len(ds) == 5 and ds[0].shape == (1, 28, 28)
    assert torch.equal(_all(ds)[:, 0], from_uint8(torch.from_numpy(imgs)))
    assert torch.equal(dataset_tensor(ds)[:, 0], torch.from_numpy(imgs))


def test_fashion_plain_files_in_root_and_resize(tmp_path):
    imgs = _fashion_images(seed=1)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(imgs))
    ds = load_dataset(cfg("fashion_mnist", tmp_path, image_size=28))
    assert torch.equal(_all(ds)[:, 0], from_uint8(torch.from_numpy(imgs)))
    ds32 = load_dataset(cfg("fashion_mnist", tmp_path, image_size=32))
    assert ds32[0].shape == (1, 32, 32)


def test_fashion_debian_path(tmp_path, monkeypatch):
    imgs = _fashion_images(seed=2)
    deb = tmp_path / "debian"
    deb.mkdir()
    (deb / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(imgs)))
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", deb)
    ds = load_dataset(cfg("fashion_mnist", None, image_size=28))
    assert torch.equal(_all(ds)[:, 0], from_uint8(torch.from_numpy(imgs)))
    # an empty root falls back to it as well
    ds2 = load_dataset(cfg("fashion_mnist", tmp_path / "empty", image_size=28))
    assert len(ds2) == 5


def test_fashion_missing(tmp_path):
    with pytest.raises(UserError, match=f"Fashion-MNIST not found: .*{tmp_path / 'x'}.*no-debian"):
        load_dataset(cfg("fashion_mnist", tmp_path / "x", image_size=28))


def test_fashion_download_needs_root():
    with pytest.raises(UserError, match="data.root is not set"):
        load_dataset(cfg("fashion_mnist", None, image_size=28, download=True))


def test_idx_truncated_and_bad_magic(tmp_path):
    blob = _idx_bytes(_fashion_images())
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(blob[:-100])
    with pytest.raises(UserError, match="truncated or corrupt"):
        read_idx(p)
    p.write_bytes(b"\x00\x00\x0d\x03" + blob[4:])  # type 0x0d (float), not ubyte
    with pytest.raises(UserError, match="not an idx ubyte file"):
        read_idx(p)
    g = tmp_path / "t.gz"
    g.write_bytes(gzip.compress(blob)[:50])
    with pytest.raises(UserError, match="cannot read"):
        read_idx(g)
    p.write_bytes(b"\x00\x00\x08\x03" + np.array([-2, 28, 28], dtype=">i4").tobytes())  # a negative count
    with pytest.raises(UserError, match=r"not an idx ubyte file \(its header gives dimensions \(-2, 28, 28\)\)"):
        read_idx(p)
    p.write_bytes(b"\x00\x00\x08\x03\x00\x00\x00\x05")  # the header cut short
    with pytest.raises(UserError, match="not an idx ubyte file"):
        read_idx(p)


def test_a_data_set_of_no_images_is_refused(tmp_path):
    """A valid idx header that counts 0 images: one error at load, not a ZeroDivisionError in
    the training loop."""
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(np.zeros((0, 28, 28), np.uint8)))
    with pytest.raises(UserError, match=f"the fashion_mnist data set in {tmp_path} holds no images"):
        load_dataset(cfg("fashion_mnist", tmp_path, image_size=28))


# ---------------------------------------------------------------- CelebA

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _face(folder, name):
    """A 178x218 image: green outside the DDIM crop box (25, 57)-(153, 185), inside it the
    top-left quadrant red and the rest blue."""
    a = np.zeros((218, 178, 3), np.uint8)
    a[:] = GREEN
    a[57:185, 25:153] = BLUE
    a[57:121, 25:89] = RED
    folder.mkdir(parents=True, exist_ok=True)
    # 4:4:4 (no chroma subsampling) keeps the colour edges sharp enough to locate
    Image.fromarray(a).save(folder / name, quality=95, subsampling=0)


def _close(pixel, colour, tol=0.2):
    return bool((pixel - (torch.tensor(colour) / 127.5 - 1)).abs().max() < tol)


def test_celeba_crop_and_resize(tmp_path):
    img_dir = tmp_path / "img_align_celeba"
    for i in (2, 1, 3):
        _face(img_dir, f"{i:06d}.jpg")
    ds = load_dataset(cfg("celeba", tmp_path, image_size=64, channels=3))
    assert len(ds) == 3 and [p.name for p in ds.paths] == ["000001.jpg", "000002.jpg", "000003.jpg"]
    x = ds[0]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    # the crop box fills the output: red top-left 32x32 quadrant, blue elsewhere, no green
    assert _close(x[:, 0, 0], RED) and _close(x[:, 16, 16], RED) and _close(x[:, 29, 29], RED)
    assert _close(x[:, 63, 63], BLUE) and _close(x[:, 10, 50], BLUE) and _close(x[:, 50, 10], BLUE)
    assert not _close(x[:, 0, 63], GREEN) and not _close(x[:, 63, 0], GREEN)
    # root may be the image folder itself; other sizes work
    ds32 = load_dataset(cfg("celeba", img_dir, image_size=32, channels=3))
    assert ds32[2].shape == (3, 32, 32)
    u = dataset_tensor(ds32)
    assert u.shape == (3, 3, 32, 32) and u.dtype == torch.uint8
    assert torch.equal(u[1], torch.from_numpy(ds32.load_uint8(1)).permute(2, 0, 1))


def test_celeba_train_partition(tmp_path):
    img_dir = tmp_path / "celeba" / "img_align_celeba"
    for i in range(1, 5):
        _face(img_dir, f"{i:06d}.jpg")
    (tmp_path / "celeba" / "list_eval_partition.txt").write_text(
        "000001.jpg 0\n000002.jpg 1\n000003.jpg 0\n000004.jpg 2\n")
    ds = load_dataset(cfg("celeba", tmp_path, image_size=64, channels=3))
    assert [p.name for p in ds.paths] == ["000001.jpg", "000003.jpg"]


def test_celeba_partition_file_that_is_not_text(tmp_path):
    _face(tmp_path / "img_align_celeba", "000001.jpg")
    (tmp_path / "list_eval_partition.txt").write_bytes(b"000001.jpg 0\n\xff\xfe\x00 0\n")
    with pytest.raises(UserError, match="cannot read .*list_eval_partition.txt as text"):
        load_dataset(cfg("celeba", tmp_path, image_size=64, channels=3))


def test_a_file_that_fails_in_a_loader_worker_is_one_line(tmp_path, capsys):
    """CelebA decodes per item, in DataLoader workers: a truncated file past the first (the one
    checked at load) reached the user as torch's re-raise, the worker's traceback in its text."""
    from s2dm.cli import main

    img_dir = tmp_path / "img_align_celeba"
    for i in range(1, 5):
        _face(img_dir, f"{i:06d}.jpg")
    bad = img_dir / "000003.jpg"
    bad.write_bytes(bad.read_bytes()[:300])
    config = tmp_path / "celeba.yaml"
    config.write_text(f"data: {{dataset: celeba, root: {tmp_path}, image_size: 8, channels: 3}}\n")
    out = tmp_path / "ref.npz"
    rc = main(["fid", "ref", "--config", str(config), "--features", "pixels", "--num-workers", "1", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith(f"error: cannot decode image {bad}") and "Traceback" not in "\n".join(err), err
    assert not out.exists()


def test_celeba_missing_and_wrong_size(tmp_path):
    with pytest.raises(UserError, match=f"CelebA not found: .*{tmp_path / 'img_align_celeba'}"):
        load_dataset(cfg("celeba", tmp_path, image_size=64, channels=3))
    with pytest.raises(UserError, match="CelebA needs data.root"):
        load_dataset(cfg("celeba", None, image_size=64, channels=3))
    d = tmp_path / "img_align_celeba"
    d.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(d / "000001.jpg")
    with pytest.raises(UserError, match="000001.jpg is 64x64, expected the aligned 178x218"):
        load_dataset(cfg("celeba", tmp_path, image_size=64, channels=3))


# ---------------------------------------------------------------- folder

def _png_folder(folder, n=3, hw=(16, 16), seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    imgs = []
    for i in range(n):
        a = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
        Image.fromarray(a).save(folder / f"img{i}.png")
        imgs.append(a)
    return np.stack(imgs)


def test_folder_round_trip(tmp_path):
    imgs = _png_folder(tmp_path)
    ds = load_dataset(cfg("folder", tmp_path, image_size=16, channels=3))
    assert len(ds) == 3
    expected = from_uint8(torch.from_numpy(imgs).permute(0, 3, 1, 2))
    assert torch.equal(_all(ds), expected)
    assert torch.equal(dataset_tensor(ds), torch.from_numpy(imgs).permute(0, 3, 1, 2))


def test_folder_size_must_match_and_gray(tmp_path):
    _png_folder(tmp_path)
    with pytest.raises(UserError, match="16x16"):
        load_dataset(cfg("folder", tmp_path, image_size=8, channels=3))
    assert load_dataset(cfg("folder", tmp_path, image_size=16, channels=1))[0].shape == (1, 16, 16)
    with pytest.raises(UserError, match="channels must be 1 or 3"):
        load_dataset(cfg("folder", tmp_path, image_size=16, channels=4))


def test_folder_errors(tmp_path):
    with pytest.raises(UserError, match=f"image folder not found: {tmp_path / 'nope'}"):
        load_dataset(cfg("folder", tmp_path / "nope", 16, 3))
    with pytest.raises(UserError, match="needs data.root"):
        load_dataset(cfg("folder", None, 16, 3))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=f"no images .* in {empty}"):
        load_dataset(cfg("folder", empty, 16, 3))
    (empty / "readme.txt").write_text("hi")
    with pytest.raises(UserError, match="no images"):
        load_dataset(cfg("folder", empty, 16, 3))
    mixed = tmp_path / "mixed"
    _png_folder(mixed, n=2)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(mixed / "small.png")
    with pytest.raises(UserError, match=r"differ in size: .*small\.png is 8x8 but .*img0\.png is 16x16"):
        load_dataset(cfg("folder", mixed, 16, 3))
    corrupt = tmp_path / "corrupt"
    _png_folder(corrupt, n=2, hw=(32, 32))
    blob = (corrupt / "img1.png").read_bytes()
    (corrupt / "img1.png").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UserError, match="cannot decode image .*img1.png"):
        load_dataset(cfg("folder", corrupt, 32, 3))


def test_download_only_when_asked(tmp_path, monkeypatch):
    calls = []

    def fake_download(cls_name, root):
        calls.append(cls_name)
        _write_cifar_dir(root / "cifar-10-batches-py", _cifar_batches())

    monkeypatch.setattr(data, "_torchvision_download", fake_download)
    with pytest.raises(UserError, match="CIFAR10 not found"):
        load_dataset(cfg("cifar10", tmp_path, 32, 3, download=False))
    assert calls == []
    assert len(load_dataset(cfg("cifar10", tmp_path, 32, 3, download=True))) == 10
    assert calls == ["CIFAR10"]


@pytest.mark.parametrize("name, says", [("celeba", "img_align_celeba.zip"), ("folder", "the folder itself")])
def test_download_is_refused_where_it_would_fetch_nothing(tmp_path, name, says):
    """CelebA and image folders cannot be downloaded: data.download: true says so up front
    instead of being ignored (it used to be, silently, when the files were there)."""
    with pytest.raises(ConfigError, match=f"fetches fashion_mnist and cifar10 only.*{says}") as e:
        load_dataset(cfg(name, tmp_path, 8, 3, download=True))
    assert e.value.key == "data.download"


def test_download_failure_is_one_line(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def offline(*args, **kwargs):
        raise OSError("network is unreachable\nsecond line")

    monkeypatch.setattr(tvd, "CIFAR10", offline)
    with pytest.raises(UserError, match=r"downloading CIFAR10 into .* failed: network is unreachable$"):
        load_dataset(cfg("cifar10", tmp_path, 32, 3, download=True))
