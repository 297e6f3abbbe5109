"""Tests for s2dm.util.images: listing, loading, value maps, PNG and grid writing."""
import numpy as np
import pytest
import torch
from PIL import Image

from s2dm.errors import UserError
from s2dm.util.images import (
    from_uint8,
    mosaic_array,
    list_images,
    load_folder,
    load_image,
    save_mosaic,
    save_png,
    to_uint8,
)


def _rand(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _write(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


# ---------------------------------------------------------------- listing

def test_list_images_recursive_sorted_and_filtered(tmp_path):
    _write(tmp_path / "b.png", _rand((4, 4, 3)))
    _write(tmp_path / "sub" / "a.JPG", _rand((4, 4, 3)))
    _write(tmp_path / "a.bmp", _rand((4, 4)))
    (tmp_path / "notes.txt").write_text("not an image")
    _write(tmp_path / ".hidden" / "x.png", _rand((4, 4, 3)))
    _write(tmp_path / "._y.png", _rand((4, 4, 3)))
    got = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert got == ["a.bmp", "b.png", "sub/a.JPG"]


def test_list_images_follows_linked_folders_without_looping(tmp_path):
    """A data set assembled from links to folders elsewhere (as torchvision's ImageFolder reads
    it); a link back up the tree and a dangling link are no images and no loop."""
    elsewhere, data = tmp_path / "elsewhere", tmp_path / "data"
    _write(elsewhere / "x.png", _rand((4, 4, 3)))
    _write(elsewhere / "deep" / "y.png", _rand((4, 4, 3)))
    _write(data / "top.png", _rand((4, 4, 3)))
    (data / "linked").symlink_to(elsewhere, target_is_directory=True)
    (data / "linked2").symlink_to(elsewhere / "deep", target_is_directory=True)  # read already, via linked
    (elsewhere / "up").symlink_to(data, target_is_directory=True)  # a loop
    (data / "gone.png").symlink_to(tmp_path / "nothing.png")
    got = [p.relative_to(data).as_posix() for p in list_images(data)]
    assert got == ["linked/deep/y.png", "linked/x.png", "top.png"]


def test_list_images_missing_folder(tmp_path):
    with pytest.raises(UserError, match="not found: .*nope"):
        list_images(tmp_path / "nope")


def test_list_images_empty_or_no_images(tmp_path):
    with pytest.raises(UserError, match=f"no images .* in {tmp_path}"):
        list_images(tmp_path)
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.npy").write_bytes(b"\x93NUMPY")
    with pytest.raises(UserError, match="no images"):
        list_images(tmp_path)


# ---------------------------------------------------------------- loading

def test_load_image_round_trip_rgb_and_gray(tmp_path):
    rgb = _rand((5, 7, 3))
    gray = _rand((5, 7), seed=1)
    p1 = _write(tmp_path / "rgb.png", rgb)
    p2 = _write(tmp_path / "gray.png", gray)
    np.testing.assert_array_equal(load_image(p1), rgb)
    np.testing.assert_array_equal(load_image(p2, "L"), gray[..., None])
    # gray to RGB replicates the plane
    np.testing.assert_array_equal(load_image(p2, "RGB"), np.repeat(gray[..., None], 3, axis=2))
    assert load_image(p1).dtype == np.uint8


def test_load_image_corrupt_png_names_file(tmp_path):
    good = _write(tmp_path / "good.png", _rand((32, 32, 3)))
    data = good.read_bytes()
    bad = tmp_path / "bad.png"
    bad.write_bytes(data[: len(data) // 2])  # truncated inside the pixel data
    with pytest.raises(UserError, match="cannot decode image .*bad.png"):
        load_image(bad)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not a png at all")
    with pytest.raises(UserError, match="junk.png"):
        load_image(junk)
    with pytest.raises(UserError, match="not found: .*missing.png"):
        load_image(tmp_path / "missing.png")


def test_load_folder_shapes_channels_and_order(tmp_path):
    imgs = [_rand((6, 6, 3), seed=i) for i in range(3)]
    for i, a in enumerate(imgs):
        _write(tmp_path / f"{i}.png", a)
    out = load_folder(tmp_path)
    assert out.shape == (3, 6, 6, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.stack(imgs))
    assert load_folder(tmp_path, channels=1).shape == (3, 6, 6, 1)
    assert load_folder(tmp_path, size=6).shape[0] == 3
    assert load_folder(tmp_path, size=(6, 6)).shape[0] == 3


def test_load_image_scales_16_bit_gray(tmp_path):
    """A 16-bit grayscale PNG (PIL mode I;16) is scaled by 1/257, not clipped at 255 as PIL's
    convert does; a 16-bit RGB PNG PIL reduces to 8 bits itself."""
    gray16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    p = _write(tmp_path / "g16" / "a.png", gray16)
    assert Image.open(p).mode == "I;16"
    expected = np.rint(gray16 / 257).astype(np.uint8)[..., None]
    np.testing.assert_array_equal(load_image(p, "L"), expected)
    np.testing.assert_array_equal(load_image(p, "RGB"), np.repeat(expected, 3, axis=2))
    np.testing.assert_array_equal(load_folder(p.parent), expected[None])  # inferred gray


def test_load_folder_infers_gray(tmp_path):
    _write(tmp_path / "a.png", _rand((4, 4)))
    assert load_folder(tmp_path).shape == (1, 4, 4, 1)


def test_load_folder_mixed_sizes(tmp_path):
    _write(tmp_path / "a.png", _rand((8, 8, 3)))
    _write(tmp_path / "b.png", _rand((8, 8, 3)))
    _write(tmp_path / "c.png", _rand((16, 8, 3)))
    with pytest.raises(UserError, match=r"differ in size: .*c\.png is 8x16 but .*a\.png is 8x8"):
        load_folder(tmp_path)


def test_a_sample_folder_is_read_without_its_preview_mosaic(tmp_path):
    """`data.dataset: folder` on an `s2dm sample` folder (it has metadata.json): the preview/
    mosaic is not a sample (it was read, and refused as another size)."""
    imgs = [_rand((8, 8), seed=i) for i in range(3)]
    for i, im in enumerate(imgs):
        _write(tmp_path / f"{i:06d}.png", im)
    _write(tmp_path / "preview" / "mosaic.png", _rand((20, 20)))
    with pytest.raises(UserError, match="differ in size"):
        load_folder(tmp_path)  # without metadata.json: an ordinary folder, every image counts
    (tmp_path / "metadata.json").write_text("{}")
    np.testing.assert_array_equal(load_folder(tmp_path), np.stack(imgs)[..., None])


def test_load_folder_expected_size_and_resize(tmp_path):
    _write(tmp_path / "a.png", _rand((8, 8, 3)))
    with pytest.raises(UserError, match=r"a\.png is 8x8 but 16x16 was expected"):
        load_folder(tmp_path, size=16)
    out = load_folder(tmp_path, resize_to=4)
    assert out.shape == (1, 4, 4, 3)
    # a flat image stays flat under resizing
    _write(tmp_path / "a.png", np.full((8, 8, 3), 77, np.uint8))
    assert (load_folder(tmp_path, resize_to=3) == 77).all()
    _write(tmp_path / "a.png", _rand((8, 6, 3)))
    with pytest.raises(UserError, match="not square"):
        load_folder(tmp_path, resize_to=4)


def test_load_folder_bad_channels(tmp_path):
    _write(tmp_path / "a.png", _rand((4, 4, 3)))
    with pytest.raises(UserError, match="channels must be 1 or 3"):
        load_folder(tmp_path, channels=2)


# ---------------------------------------------------------------- value maps

def test_to_uint8_known_values():
    x = torch.tensor([-3.0, -1.0, -0.999, 0.0, 0.5, 1.0, 2.0])
    # floor((x+1)*127.5 + 0.5): what torchvision's save_image computes on (x+1)/2
    assert to_uint8(x).tolist() == [0, 0, 0, 128, 191, 255, 255]
    assert to_uint8(x).dtype == torch.uint8


def test_uint8_round_trip_is_exact():
    u = torch.arange(256, dtype=torch.uint8)
    x = from_uint8(u)
    assert x.dtype == torch.float32
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert torch.equal(to_uint8(x), u)


def test_to_uint8_matches_save_image_formula():
    x = torch.rand(1000) * 2.4 - 1.2
    ref = ((x + 1) / 2).mul(255).add(0.5).clamp(0, 255).to(torch.uint8)
    assert (to_uint8(x).int() - ref.int()).abs().max() <= 1  # float rounding at .5 only
    assert (to_uint8(x) == ref).float().mean() > 0.99


def test_to_uint8_rejects_nan_and_ints():
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(torch.tensor([0.0, float("nan")]))
    with pytest.raises(TypeError):
        to_uint8(torch.zeros(3, dtype=torch.uint8))


# ---------------------------------------------------------------- writing

def test_save_png_round_trips(tmp_path):
    rgb = _rand((5, 6, 3))
    save_png(rgb, tmp_path / "out" / "rgb.png")
    np.testing.assert_array_equal(load_image(tmp_path / "out" / "rgb.png"), rgb)

    gray = _rand((5, 6, 1))
    save_png(gray, tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode == "L"
    np.testing.assert_array_equal(load_image(tmp_path / "g.png", "L"), gray)

    t = torch.rand(3, 4, 5) * 2 - 1
    save_png(t, tmp_path / "t.png")
    np.testing.assert_array_equal(load_image(tmp_path / "t.png"),
                                  to_uint8(t).permute(1, 2, 0).numpy())
    # no temp files left behind by the atomic write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png", "out", "t.png"]


def test_save_png_rejects_float_numpy(tmp_path):
    with pytest.raises(TypeError):
        save_png(np.zeros((4, 4, 3), np.float32), tmp_path / "x.png")


def test_grid_layout_upscale_and_padding(tmp_path):
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(10, 1, 8, 8, generator=g) * 2 - 1
    grid = save_mosaic(imgs, tmp_path / "mosaic.png", nrow=5, pad=2)
    # 5 tiles of 8 px -> upscaled x7 (5*8*7 = 280 >= 256)
    k = 7
    assert grid.shape == (2 * 8 * k + 3 * 2, 5 * 8 * k + 6 * 2, 1)
    assert grid.shape[1] >= 256
    np.testing.assert_array_equal(load_image(tmp_path / "mosaic.png", "L"), grid)
    u = to_uint8(imgs)
    # image 6 sits in row 1, column 1; each pixel became a k x k block
    top, left = 2 + (8 * k + 2), 2 + (8 * k + 2)
    tile = grid[top:top + 8 * k, left:left + 8 * k, 0]
    np.testing.assert_array_equal(tile[::k, ::k], u[6, 0].numpy())
    np.testing.assert_array_equal(tile[k - 1::k, k - 1::k], u[6, 0].numpy())
    assert (grid[:2] == 255).all() and (grid[:, :2] == 255).all()


def test_grid_default_square_and_rgb(tmp_path):
    imgs = torch.zeros(5, 3, 32, 32)
    imgs[:, 0] = 1.0  # red
    grid = mosaic_array(imgs, pad=0, min_width=1)
    # ceil(sqrt(5)) = 3 per row, 2 rows, unused slot left as padding colour
    assert grid.shape == (64, 96, 3)
    assert (grid[:32, :32] == [255, 128, 128]).all()
    assert (grid[32:, 64:] == 255).all()
    save_mosaic(imgs, tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode == "RGB"
    assert Image.open(tmp_path / "g.png").size[0] >= 256
