"""lpd.images input side: load_image / load_mask (path, PIL, array; the ADM crop; errors naming the
file or the array), image_to_tensor as the inverse of to_uint8."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lpd.images import (
    ImageFileError,
    center_crop_arr,
    image_folder,
    image_to_tensor,
    load_image,
    load_mask,
    to_uint8,
)

S = 32


@pytest.fixture()
def photo() -> np.ndarray:
    """A 75x50 (HxW) RGB image of noise: not square, not a multiple of S."""
    return np.random.default_rng(0).integers(0, 256, (75, 50, 3), dtype=np.uint8)


def test_load_image_from_path_pil_and_array_agree(tmp_path, photo):
    Image.fromarray(photo).save(tmp_path / "a.png")
    want = center_crop_arr(Image.fromarray(photo), S)
    for source in (str(tmp_path / "a.png"), tmp_path / "a.png", Image.fromarray(photo), photo):
        got = load_image(source, S)
        assert got.dtype == np.uint8 and got.shape == (S, S, 3)
        assert np.array_equal(got, want)
    assert np.array_equal(load_image(Image.fromarray(photo).convert("RGBA"), S), want)
    (tmp_path / "cls").mkdir()  # the training ImageFolder (the cache's input) crops alike
    Image.fromarray(photo).save(tmp_path / "cls" / "a.png")
    assert torch.equal(image_folder(str(tmp_path), S)[0][0], image_to_tensor(want)[0])


def test_load_image_of_the_target_size_is_unchanged(photo):
    square = photo[:S, :S]
    assert np.array_equal(load_image(square, S), square)
    assert np.array_equal(
        load_image(square[:, ::-1], S), square[:, ::-1]
    )  # non-contiguous arrays too


def test_load_image_file_errors_name_the_path(tmp_path, photo):
    Image.fromarray(photo).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.png").write_text("not an image")
    for name in ("missing.png", "cut.png", "notes.png"):
        with pytest.raises(ImageFileError, match=rf"image file '.*{name}' cannot be read"):
            load_image(tmp_path / name, S)
    with pytest.raises(ImageFileError, match="mask file"):
        load_mask(tmp_path / "cut.png", S)


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((8, 8), np.uint8),
        np.zeros((8, 8, 4), np.uint8),
        np.zeros((8, 8, 3), np.float32),
        np.zeros((0, 8, 3), np.uint8),
    ],
)
def test_load_image_refuses_bad_arrays(array):
    with pytest.raises(ValueError, match=r"image array must be uint8 \[H, W, 3\], got"):
        load_image(array, S)


def test_load_image_refuses_other_inputs_and_sizes(photo):
    with pytest.raises(TypeError, match="file path, a PIL image or a numpy array"):
        load_image(photo.tolist(), S)
    for size in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="img_size must be a positive integer"):
            load_image(photo, size)


def test_load_mask_of_the_target_size_is_taken_as_is(tmp_path):
    mask = np.zeros((S, S), bool)
    mask[4:20, 10:30] = True
    Image.fromarray(mask).save(tmp_path / "m.png")
    for source in (
        mask,
        mask.astype(np.uint8) * 255,
        Image.fromarray(mask),
        tmp_path / "m.png",
        np.repeat(mask[..., None].astype(np.uint8) * 255, 3, axis=2),
    ):
        got = load_mask(source, S)
        assert got.dtype == np.bool_ and got.shape == (S, S) and np.array_equal(got, mask)


def test_load_mask_of_the_image_size_gets_the_image_crop(photo):
    half = np.zeros((75, 50), bool)
    half[:, :20] = True  # white left part, on a non-square image
    image = np.where(half[..., None], 255, 0).astype(np.uint8).repeat(3, axis=2)
    got = load_mask(half, S, image=photo)
    assert got.shape == (S, S)
    assert np.array_equal(
        got, load_image(image, S)[..., 0] >= 128
    )  # the same pixels as the cropped image
    assert got[:, 0].all() and not got[:, -1].any()


def test_load_mask_refuses_other_sizes_and_masks_that_select_nothing(photo):
    with pytest.raises(ValueError, match=r"mask is 75x50 \(HxW\), not 32x32.*pass image="):
        load_mask(np.zeros((75, 50), bool), S)
    with pytest.raises(ValueError, match=r"mask is 40x50 \(HxW\) but its image is 75x50"):
        load_mask(np.zeros((40, 50), bool), S, image=photo)
    for empty in (
        np.zeros((S, S), bool),
        np.zeros((S, S), np.uint8),
        np.full((S, S), 100, np.uint8),
    ):
        with pytest.raises(ValueError, match="selects no pixel: white .* marks what to regenerate"):
            load_mask(empty, S)
    outside = np.zeros((75, 50), bool)
    outside[:5] = True  # white only where the crop cuts the image
    with pytest.raises(ValueError, match="selects no pixel of the cropped image"):
        load_mask(outside, S, image=photo)
    with pytest.raises(
        ValueError, match=r"mask array must be uint8 \[H, W, 3\] or bool / uint8 \[H, W\]"
    ):
        load_mask(np.zeros((S, S), np.float32), S)


def test_0_1_masks_of_any_depth_select_their_ones(tmp_path):
    want = np.zeros((S, S), bool)
    want[4:20, 8:30] = True
    Image.fromarray(want.astype(np.uint8)).save(tmp_path / "01.png")  # 8-bit 0/1: looks black
    Image.fromarray(want.astype(np.uint16)).save(tmp_path / "01_16.png")  # 16-bit 0/1
    Image.fromarray(want.astype(np.uint16) * 65535).save(tmp_path / "white16.png")  # 16-bit 0/65535
    Image.fromarray(np.stack([want.astype(np.uint8)] * 3, -1)).save(tmp_path / "01_rgb.png")
    for name in ("01.png", "01_16.png", "white16.png", "01_rgb.png"):
        assert np.array_equal(load_mask(tmp_path / name, S), want), name
    assert np.array_equal(load_mask(want.astype(np.uint8), S), want)  # a 0/1 array too
    assert np.array_equal(load_mask(want, None), want)  # img_size None: as drawn


def test_16_bit_pngs_read_as_their_grey_values(tmp_path):
    from lpd.images import convert, read_image

    grey = np.arange(S * S, dtype=np.int64).reshape(S, S) % 256
    Image.fromarray((grey * 257).astype(np.uint16)).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode == "I;16"  # PIL's own convert("RGB") makes this white
        assert np.array_equal(center_crop_arr(im, S)[..., 1], grey)
        assert np.array_equal(
            np.asarray(convert(im.convert("I"), "L")), grey
        )  # 32-bit ints hold 16-bit values
    assert np.array_equal(load_image(tmp_path / "g16.png", S), np.stack([grey] * 3, -1))
    assert np.array_equal(np.asarray(read_image(tmp_path / "g16.png"))[..., 0], grey)
    floats = Image.fromarray((grey / 255).astype(np.float32), "F")  # float greys in 0..1
    assert np.array_equal(np.asarray(convert(floats, "L")), grey)


def test_a_long_thin_image_crops_with_work_bounded_by_the_output(tmp_path, monkeypatch):
    from lpd import images

    Image.new("RGB", (1, 30000), (10, 200, 30)).save(tmp_path / "thin.png")  # a few hundred bytes
    sizes, resize = [], Image.Image.resize
    monkeypatch.setattr(
        Image.Image,
        "resize",
        lambda im, size, *a, **k: sizes.append(size) or resize(im, size, *a, **k),
    )
    out = load_image(
        tmp_path / "thin.png", 256
    )  # ADM's resize would allocate 256 x 7,680,000 pixels
    assert out.shape == (256, 256, 3) and (out == (10, 200, 30)).all()
    assert max(w * h for w, h in sizes) <= images.MAX_ASPECT_WORK * 256**2
    # beyond 16 crops of work the crop alone is resampled: within a level of ADM's pixels on a smooth image
    y, x = np.mgrid[0:40, 0:900]
    ramp = np.stack([x * 255 // 899, y * 255 // 39, (x + y) % 256], -1).astype(np.uint8)
    bounded = load_image(ramp, S)
    monkeypatch.setattr(images, "MAX_ASPECT_WORK", 10**9)
    assert np.abs(load_image(ramp, S).astype(int) - bounded).max() <= 1


def test_a_decompression_bomb_is_refused_with_the_file_name(tmp_path, monkeypatch):
    Image.new("RGB", (100, 100)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(
        Image, "MAX_IMAGE_PIXELS", 1000
    )  # PIL's cap: 2x this many pixels is refused
    with pytest.raises(
        ImageFileError, match=r"image file .*bomb\.png' cannot be read \(DecompressionBombError"
    ):
        load_image(tmp_path / "bomb.png", S)


def test_image_to_tensor_inverts_to_uint8():
    every = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    x = image_to_tensor(every)
    assert x.dtype == torch.float32 and x.shape == (1, 3, 16, 16) and x.is_contiguous()
    assert x.min() == -1.0 and x.max() == 1.0
    assert np.array_equal(to_uint8(x)[0], every)
    batch = np.stack([every, every[::-1]])
    assert torch.equal(image_to_tensor(batch), image_to_tensor(torch.from_numpy(batch)))
    assert torch.equal(image_to_tensor(batch)[1], image_to_tensor(every[::-1])[0])


@pytest.mark.parametrize(
    "bad",
    [np.zeros((2, 3, 8, 8), np.uint8), np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.uint8)],
)
def test_image_to_tensor_refuses_bad_input(bad):
    with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\] or \[B, H, W, 3\]"):
        image_to_tensor(bad)
