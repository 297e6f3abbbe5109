"""FD-cnn: the labelled data sets, s2dm's own small classifier (deterministic, cached by hash,
accurate enough), its features as a statistics kind of their own, and the refusals that keep
them apart from FID, FD-pixels and other classifiers' features.

Every test sees a temporary ``$S2DM_CACHE``; the real ``~/.cache/s2dm`` is never touched. The
digits classifier trains in seconds; Fashion-MNIST's (about 45 s on one thread) only in the
slow tests, and only where its files are installed.
"""
import gzip
import io
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from s2dm.errors import DataError, MetricError
from s2dm.io import data
from s2dm.io.config import DataConfig
from s2dm.io.data import dataset_tensor, labelled_splits, load_dataset, load_labelled
from s2dm.metrics import classifier as C
from s2dm.metrics.features import FeatureExtractor
from s2dm.metrics.fid import compare, extractor_for, frechet_distance, reference_stats
from s2dm.metrics.statistics import FEATURES, Stats, feature_kind, metric_label, metric_name, parse_kind

DIGITS = DataConfig()  # digits, 8x8, one channel
FASHION = DataConfig(dataset="fashion_mnist", image_size=28)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("s2dm_cache")


@pytest.fixture(autouse=True)
def _cache_env(cache, monkeypatch):
    monkeypatch.setenv(C.CACHE_ENV, str(cache))


@pytest.fixture(scope="module")
def digits_clf(cache):
    """The digits classifier, trained once into the module's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(C.CACHE_ENV, str(cache))
        return C.load_classifier(C.ensure_classifier(DIGITS))


@pytest.fixture(scope="module")
def digits_ref(digits_clf, tmp_path_factory):
    """FD-cnn reference statistics of all 1,797 digits training images."""
    out = tmp_path_factory.mktemp("ref") / "digits-cnn.npz"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(C.CACHE_ENV, str(digits_clf.path.parent))
        reference_stats("configs/digits.yaml", out, features="cnn", device="cpu", progress=False)
    return out


def png_folder(folder, images):
    """uint8 (N, 1, H, W) → grayscale PNGs."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im[0].numpy()).save(folder / f"{i:04d}.png")
    return folder


# ---------------------------------------------------------------- labels

def idx_bytes(arr):
    """An idx ubyte file's bytes (the MNIST format)."""
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def fake_fashion(folder, n=20, n_test=10, seed=0, gz=True):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = {"train-images-idx3-ubyte": rng.integers(0, 256, (n, 28, 28)),
             "train-labels-idx1-ubyte": np.arange(n) % 10,
             "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
             "t10k-labels-idx1-ubyte": (np.arange(n_test) * 3) % 10}
    for name, arr in files.items():
        blob = idx_bytes(arr)
        (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(blob) if gz else blob)
    return files


def test_digits_labels_match_the_training_images():
    x, y = load_labelled(DIGITS)
    assert x.dtype == torch.uint8 and tuple(x.shape) == (1797, 1, 8, 8)
    assert y.dtype == torch.int64 and y.shape == (1797,) and sorted(torch.unique(y).tolist()) == list(range(10))
    assert torch.equal(x, dataset_tensor(load_dataset(DIGITS)))  # the very images load_dataset gives
    assert labelled_splits(DIGITS) == ("train",)
    with pytest.raises(DataError, match="digits has no test split"):
        load_labelled(DIGITS, "test")
    x16, y16 = load_labelled(replace(DIGITS, image_size=16))
    assert tuple(x16.shape) == (1797, 1, 16, 16) and torch.equal(y16, y)


def test_fashion_labels_beside_the_images(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    files = fake_fashion(tmp_path / "fm")
    cfg = replace(FASHION, root=str(tmp_path / "fm"))
    x, y = load_labelled(cfg)
    assert torch.equal(x[:, 0], torch.from_numpy(files["train-images-idx3-ubyte"].astype(np.uint8)))
    assert y.tolist() == files["train-labels-idx1-ubyte"].tolist()
    assert torch.equal(x, dataset_tensor(load_dataset(cfg)))
    tx, ty = load_labelled(cfg, "test")
    assert tuple(tx.shape) == (10, 1, 28, 28) and ty.tolist() == files["t10k-labels-idx1-ubyte"].tolist()
    assert labelled_splits(cfg) == ("train", "test")
    assert tuple(load_labelled(replace(cfg, image_size=32))[0].shape) == (20, 1, 32, 32)
    (tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz").unlink()
    assert labelled_splits(cfg) == ("train",)
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_labelled(cfg, "test")
    (tmp_path / "fm" / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.arange(7) % 10)))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz holds labels of shape"):
        load_labelled(cfg)
    (tmp_path / "fm" / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"labels not found: no train-labels-idx1-ubyte\[.gz\] beside"):
        load_labelled(cfg)


@pytest.mark.parametrize("cfg", [DataConfig(dataset="cifar10", image_size=32, channels=3),
                                 DataConfig(dataset="celeba", image_size=64, channels=3),
                                 DataConfig(dataset="folder", image_size=8, root="/nonexistent")])
def test_unlabelled_sets_are_one_clear_error(cfg):
    words = f"^data.dataset: FD-cnn needs a labelled data set \\(digits, fashion_mnist\\); {cfg.dataset} has no class labels"
    with pytest.raises(DataError, match=words) as exc:
        load_labelled(cfg)
    assert "\n" not in str(exc.value)
    assert labelled_splits(cfg) == ()
    with pytest.raises(DataError, match=words):  # one check, one class, wherever it is made
        C.ensure_classifier(cfg)


# ---------------------------------------------------------------- the classifier

def test_held_out_split_is_stratified_seeded_and_disjoint():
    _, y = load_labelled(DIGITS)
    train, test = C.held_out_split(y, seed=0)
    assert len(train) + len(test) == 1797 and not set(train.tolist()) & set(test.tolist())
    counts, held = torch.bincount(y), torch.bincount(y[test], minlength=10)
    assert all(abs(int(h) - 0.2 * int(c)) <= 0.5 for h, c in zip(held, counts))  # 20 % of every class
    assert torch.equal(C.held_out_split(y, seed=0)[1], test)
    assert not torch.equal(C.held_out_split(y, seed=1)[1], test)


def test_training_is_bit_identical_and_leaves_threads_and_rng_alone():
    d = C.labelled_data(DIGITS)
    arch, quick = C.architecture(1, 8), C.Recipe(epochs=2, batch_size=32, lr=3e-3)  # determinism needs no more
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        before = torch.get_rng_state()
        a, acc_a = C.train_classifier(d, arch, quick, seed=0)
        assert torch.get_num_threads() == 2 and torch.equal(torch.get_rng_state(), before)
    finally:
        torch.set_num_threads(threads)
    b, acc_b = C.train_classifier(d, arch, quick, seed=0)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) and acc_a == acc_b
    c, _ = C.train_classifier(d, arch, quick, seed=1)
    assert not torch.equal(a["fc.weight"], c["fc.weight"])


def test_digits_accuracy_and_file(digits_clf, cache):
    assert re.fullmatch(r"classifier-digits-[0-9a-f]{12}\.pt", digits_clf.path.name)
    assert digits_clf.path.parent == cache and digits_clf.path.name[18:30] == digits_clf.sha256[:12]
    assert (digits_clf.dataset, digits_clf.image_size, digits_clf.channels, digits_clf.dim) == ("digits", 8, 1, 64)
    assert digits_clf.seed == C.DEFAULT_SEED and "359" in digits_clf.accuracy_on
    assert digits_clf.accuracy >= 0.97  # measured 0.994 (357 of 359 held-out images)
    d = C.labelled_data(DIGITS)
    assert C.accuracy(digits_clf.model, d.test_x, d.test_y) == digits_clf.accuracy  # the recorded number is real
    blob = torch.load(digits_clf.path, weights_only=True)
    assert blob["version"] == C.CLASSIFIER_VERSION and blob["sha256"] == digits_clf.sha256


def test_cache_hit_does_not_train_and_a_corrupt_file_is_retrained(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(C.CACHE_ENV, str(tmp_path / "cache"))
    calls = []
    real = C.train_classifier
    monkeypatch.setattr(C, "train_classifier", lambda *a, **k: calls.append(1) or real(*a, **k))
    path = C.ensure_classifier(DIGITS)
    assert len(calls) == 1 and path.parent == tmp_path / "cache"
    first = path.read_bytes()
    assert C.ensure_classifier(DIGITS) == path and len(calls) == 1  # loaded, not trained
    capsys.readouterr()
    path.write_bytes(b"not a torch file")
    assert C.ensure_classifier(DIGITS) == path and len(calls) == 2
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if "training it again" in line]) == 1 and str(path) in err
    # retrained over: the same weights as the first time (training is deterministic)
    retrained = C.load_classifier(path).weights_sha256
    assert retrained == torch.load(io.BytesIO(first), weights_only=True)["weights_sha256"]


def test_cache_key_follows_seed_data_and_version(monkeypatch):
    d = C.labelled_data(DIGITS)
    arch, recipe = C.architecture(1, 8), C.RECIPES["digits"]
    key = C.classifier_key("digits", arch, recipe, 0, d)
    assert key == C.classifier_key("digits", arch, recipe, 0, C.labelled_data(DIGITS))
    assert C.classifier_key("digits", arch, recipe, 1, C.labelled_data(DIGITS, seed=1)) != key
    assert C.classifier_key("digits", arch, recipe, 1, d) != key  # the seed alone changes it
    x = d.train_x.clone()
    x[0, 0, 0, 0] ^= 1
    assert C.classifier_key("digits", arch, recipe, 0, replace(d, train_x=x)) != key
    y = d.test_y.clone()
    y[0] = (y[0] + 1) % 10
    assert C.classifier_key("digits", arch, recipe, 0, replace(d, test_y=y)) != key
    assert C.classifier_key("digits", arch, replace(recipe, epochs=3), 0, d) != key
    monkeypatch.setattr(C, "CLASSIFIER_VERSION", C.CLASSIFIER_VERSION + 1)
    assert C.classifier_key("digits", arch, recipe, 0, d) != key
    assert C.classifier_path("digits", key) == C.cache_dir() / f"classifier-digits-{key[:12]}.pt"
    monkeypatch.delenv(C.CACHE_ENV)
    assert C.cache_dir() == Path.home() / ".cache" / "s2dm"


def test_damaged_or_foreign_files_are_refused(digits_clf, tmp_path):
    blob = torch.load(digits_clf.path, weights_only=True)
    blob["state_dict"]["fc.weight"][0, 0] += 1.0  # one weight changed inside the file
    torch.save(blob, tmp_path / "damaged.pt")
    with pytest.raises(MetricError, match="damaged"):
        C.load_classifier(tmp_path / "damaged.pt")
    torch.save({"a": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(MetricError, match="not an s2dm FD-cnn classifier file"):
        C.load_classifier(tmp_path / "foreign.pt")
    with pytest.raises(MetricError, match="holds classifier"):
        C.load_classifier(digits_clf.path, "0" * 64)
    with pytest.raises(MetricError, match="classifier file not found"):
        C.load_classifier(tmp_path / "missing.pt")


# ---------------------------------------------------------------- names and statistics

def test_feature_kind_and_labels():
    assert "cnn" in FEATURES and feature_kind("cnn", 2048) == "cnn" and parse_kind("cnn") == ("cnn", 0)
    assert metric_name("cnn") == "FD-cnn"
    assert metric_label(metric_name("cnn"), 1000) == "FD-cnn-1k"
    assert metric_label(metric_name("cnn"), 5000) == "FD-cnn-5k"
    assert metric_label(metric_name("cnn"), 60000) == "FD-cnn-60k"  # never FID, and its N at any N
    assert "FID" not in metric_label(metric_name("cnn"), 60000)


def test_reference_and_fd_values(digits_clf, digits_ref, tmp_path):
    ref = Stats.load(digits_ref)
    assert (ref.features, ref.metric, ref.n, ref.dim, ref.shape) == ("cnn", "FD-cnn", 1797, 64, (1, 8, 8))
    assert ref.weights_sha256 == digits_clf.sha256 and Path(ref.weights_path) == digits_clf.path
    assert ref.classifier_accuracy == digits_clf.accuracy
    assert "classifier " + digits_clf.sha256[:12] in ref.describe()
    # the statistics are those of the classifier's features of the training images
    x = dataset_tensor(load_dataset(DIGITS)).to(torch.uint8)
    f = digits_clf.features(x)
    assert f.dtype == np.float64 and f.shape == (1797, 64)
    assert (f < 0).any() and (f.std(0) > 0).all()  # before the ReLU: no dead, zero-variance feature
    assert np.allclose(ref.mu, f.mean(0), atol=1e-10) and np.allclose(ref.sigma, np.cov(f, rowvar=False), atol=1e-9)
    assert frechet_distance(ref, ref) < 1e-6
    # held-out digits (not trained on) against the training set: small, not zero
    d = C.labelled_data(DIGITS)
    held = compare(png_folder(tmp_path / "held", d.test_x), digits_ref, device="cpu", progress=False)
    assert held["label"] == "FD-cnn-359" and held["metric"] == "FD-cnn" and held["features"] == "cnn"
    assert held["weights"]["sha256"] == digits_clf.sha256 and held["weights"]["accuracy"] == digits_clf.accuracy
    assert 0.5 < held["value"] < 20, held["value"]  # measured 1.85
    # uniform noise images: far away
    noise = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (359, 1, 8, 8), dtype=np.uint8))
    far = compare(png_folder(tmp_path / "noise", noise), digits_ref, device="cpu", progress=False)
    assert far["value"] > 20 * held["value"], (far["value"], held["value"])  # measured ~680
    # the first 1,000 training images (digits come sorted by writer: a subset, not a random one)
    first = compare(png_folder(tmp_path / "first", x[:1000]), digits_ref, device="cpu", progress=False)
    assert first["label"] == "FD-cnn-1k" and 0 < first["value"] < 0.1 * far["value"]  # measured 2.24


def test_extractor_kinds_of_input(digits_clf, digits_ref, tmp_path):
    ext = FeatureExtractor("cnn", data=DIGITS, device="cpu", progress=False)
    x = dataset_tensor(load_dataset(DIGITS))
    st = ext.stats_of_uint8([x[:1000], x[1000:]], 1797, "digits")
    ref = Stats.load(digits_ref)
    assert ext.weights_path == digits_clf.path and ext.dims == 64 and ext.metric == "FD-cnn"
    assert np.allclose(st.mu, ref.mu, atol=1e-12) and st.weights_sha256 == ref.weights_sha256
    by_file = FeatureExtractor("cnn", weights=digits_clf.path, device="cpu", progress=False)
    files = by_file.stats_of_files(sorted(png_folder(tmp_path / "a", x[:50]).iterdir()), "a")
    assert np.allclose(files.mu, digits_clf.features(x[:50]).mean(0), atol=1e-12)
    assert files.classifier_accuracy == digits_clf.accuracy
    with pytest.raises(MetricError, match="takes 1x8x8 images"):
        ext.stats_of_uint8([torch.zeros(4, 1, 16, 16, dtype=torch.uint8)], 4, "big")
    with pytest.raises(MetricError, match="need their classifier"):
        FeatureExtractor("cnn", device="cpu").load()
    assert extractor_for(ref, device="cpu").weights_arg == digits_clf.path


# ---------------------------------------------------------------- refusals and round trips

def test_mixing_kinds_classifiers_and_sizes_is_refused(digits_clf, digits_ref, tmp_path):
    ref = Stats.load(digits_ref)
    pixels = reference_stats("configs/digits.yaml", tmp_path / "pixels.npz", features="pixels", progress=False)
    with pytest.raises(MetricError, match="cannot compare FD-pixels statistics .* with FD-cnn"):
        compare(digits_ref, tmp_path / "pixels.npz", progress=False)
    with pytest.raises(MetricError, match="cannot compare"):
        frechet_distance(ref, pixels)
    other = replace(ref, weights_sha256="f" * 64, path=None, source="other")
    other.save(tmp_path / "other.npz")
    with pytest.raises(MetricError, match="different classifiers"):
        compare(digits_ref, tmp_path / "other.npz", progress=False)
    with pytest.raises(MetricError, match="different classifiers"):
        frechet_distance(ref, other)
    # a classifier file given for a folder must be the .npz's own
    blob = torch.load(digits_clf.path, weights_only=True)
    blob["sha256"] = "e" * 64
    torch.save(blob, tmp_path / "classifier-digits-eeeeeeeeeeee.pt")
    x = dataset_tensor(load_dataset(DIGITS))
    folder = png_folder(tmp_path / "imgs", x[:20])
    with pytest.raises(MetricError, match="live in different spaces"):
        compare(folder, digits_ref, weights=tmp_path / "classifier-digits-eeeeeeeeeeee.pt", progress=False)
    # images of another size or colour than the classifier takes
    big = png_folder(tmp_path / "big", torch.zeros(4, 1, 16, 16, dtype=torch.uint8) + torch.arange(4)[:, None, None, None].byte())
    with pytest.raises(MetricError, match="takes 1x8x8 images.*these are 1x16x16"):
        compare(big, digits_ref, progress=False)
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(rgb / f"{i}.png")
    with pytest.raises(MetricError, match="these are 3x8x8"):
        compare(rgb, digits_ref, progress=False)
    with pytest.raises(MetricError, match="FD-cnn of two folders needs the classifier"):
        compare(folder, big, features="cnn", progress=False)


def test_npz_round_trip_keeps_the_classifier(digits_ref, tmp_path):
    ref = Stats.load(digits_ref)
    ref.save(tmp_path / "again.npz")
    again = Stats.load(tmp_path / "again.npz")
    for field in ("features", "n", "weights_sha256", "weights_path", "shape", "classifier_accuracy"):
        assert getattr(again, field) == getattr(ref, field), field
    assert np.array_equal(again.mu, ref.mu) and np.array_equal(again.sigma, ref.sigma)
    with np.load(digits_ref) as f:
        assert str(f["metric"]) == "FD-cnn" and str(f["features"]) == "cnn"
        old = {k: f[k] for k in f.files if k != "classifier_accuracy"}
    np.savez(tmp_path / "old.npz", **old)  # a file from before classifier_accuracy existed
    assert Stats.load(tmp_path / "old.npz").classifier_accuracy is None


def test_compare_finds_the_classifier_by_hash_or_says_how_to_rebuild(digits_clf, digits_ref, tmp_path, monkeypatch):
    ref = Stats.load(digits_ref)
    moved = replace(ref, weights_path=str(tmp_path / "gone.pt"), path=None)
    moved.save(tmp_path / "moved.npz")
    folder = png_folder(tmp_path / "imgs", dataset_tensor(load_dataset(DIGITS))[:30])
    res = compare(folder, tmp_path / "moved.npz", progress=False)  # the recorded file is gone: the cache
    assert res["weights"]["path"] == str(digits_clf.path) and "moved.npz" in res["weights"]["found"]
    assert compare(tmp_path / "moved.npz", digits_ref, progress=False)["value"] < 1e-6  # .npz only: no classifier needed
    # the recorded path is gone and the cache is elsewhere: where it looked, and how to rebuild it
    monkeypatch.setenv(C.CACHE_ENV, str(tmp_path / "empty-cache"))
    with pytest.raises(MetricError) as exc:
        compare(folder, tmp_path / "moved.npz", progress=False)
    msg = str(exc.value)
    assert "gone.pt" in msg and "empty-cache" in msg and "cnn reference statistics of its config" in msg
    # the recorded path alone is enough
    shutil.copy(digits_clf.path, tmp_path / "gone.pt")
    assert compare(folder, tmp_path / "moved.npz", progress=False)["weights"]["path"] == str(tmp_path / "gone.pt")


# ---------------------------------------------------------------- Fashion-MNIST (slow: ~45 s of training)

def _fashion_or_skip():
    if "test" not in labelled_splits(FASHION):
        pytest.skip(f"Fashion-MNIST with its t10k test split not found (e.g. in {data.DEBIAN_FASHION_MNIST}; "
                    "apt-get install dataset-fashion-mnist)")


@pytest.mark.slow
def test_fashion_mnist_classifier_and_fd(tmp_path):
    _fashion_or_skip()
    clf = C.load_classifier(C.ensure_classifier(FASHION))
    assert (clf.dim, clf.image_size, clf.channels) == (128, 28, 1) and "test split (10000" in clf.accuracy_on
    assert clf.accuracy >= 0.88  # measured 0.9015
    ext = FeatureExtractor("cnn", data=FASHION, device="cpu", progress=False)
    x, _ = load_labelled(FASHION)
    tx, _ = load_labelled(FASHION, "test")
    train = ext.stats_of_uint8([x[i:i + 5000] for i in range(0, 60000, 5000)], 60000, "train")
    test = ext.stats_of_uint8([tx], 10000, "test")
    noise = ext.stats_of_uint8([torch.randint(0, 256, (2000, 1, 28, 28), dtype=torch.uint8,
                                              generator=torch.Generator().manual_seed(0))], 2000, "noise")
    assert metric_label(train.metric, train.n) == "FD-cnn-60k" and metric_label(test.metric, test.n) == "FD-cnn-10k"
    held, far = frechet_distance(test, train), frechet_distance(noise, train)
    assert frechet_distance(train, train) < 1e-6 and 0 < held < 0.05 * far, (held, far)


def test_cli_two_folders_with_the_classifier_flag(digits_clf, digits_ref, tmp_path, capsys):
    """`s2dm fid A B --classifier PATH`: FD-cnn of two folders (the classifier's flag; it was
    reachable only as --inception-weights), equal to A against the statistics of B."""
    from s2dm.cli import main

    d = C.labelled_data(DIGITS)
    held = png_folder(tmp_path / "held", d.test_x)
    train = png_folder(tmp_path / "train", dataset_tensor(load_dataset(DIGITS)).to(torch.uint8))
    assert main(["fid", str(held), str(train), "--classifier", str(digits_clf.path), "--device", "cpu", "--json"]) == 0
    res = __import__("json").loads(capsys.readouterr().out)
    assert res["label"] == "FD-cnn-359" and res["weights"]["sha256"] == digits_clf.sha256
    against_npz = compare(held, digits_ref, device="cpu", progress=False)["value"]
    # the same float64 features of the same pixels: measured equal; 1e-12 leaves room for the
    # rounding of moment sums taken in other batches
    assert res["value"] == pytest.approx(against_npz, rel=1e-12)
    assert main(["fid", str(held), str(train), "--features", "cnn"]) == 2
    assert "(--classifier PATH)" in capsys.readouterr().err
    assert main(["fid", str(held), str(train), "--classifier", str(digits_clf.path), "--features", "pixels"]) == 2
    assert capsys.readouterr().err.startswith("error: --classifier is FD-cnn's network")
