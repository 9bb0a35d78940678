"""Tests for lpd.tokenizer.palette: exact round trips, the VQ interface, devices and clear errors."""

from __future__ import annotations

import pytest
import torch

from lpd.tokenizer.palette import PaletteTokenizer, images_to_uint8, uint8_to_images


@pytest.mark.parametrize("levels", [2, 4, 8, 16])
def test_round_trips_are_exact(levels: int) -> None:
    tok = PaletteTokenizer(levels)
    g = torch.Generator().manual_seed(levels)
    tokens = torch.randint(0, levels, (3, 4, 5), generator=g)
    images = tok.decode(tokens)
    assert images.shape == (3, 3, 64, 80) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert torch.equal(tok.encode(images), tokens)  # encode(decode(t)) == t
    assert torch.equal(tok.decode(tok.encode(images)), images)  # decode(encode(x)) == x
    # through uint8 and back (what PNG files and the metrics see)
    assert torch.equal(tok.encode(uint8_to_images(images_to_uint8(images))), tokens)


def test_interface_and_flat_tokens() -> None:
    tok = PaletteTokenizer()
    assert tok.codebook_size == 4 and tok.downsample_factor == 16
    assert len(list(tok.parameters())) == 0 and len(tok.state_dict()) == 0
    tokens = torch.randint(0, 4, (2, 16, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(tok.decode(tokens.flatten(1)), tok.decode(tokens))  # raster [B, N]
    assert tok.decode(tokens).shape == (2, 3, 256, 256)
    palette = tok.decode(torch.arange(4).view(1, 1, 4))[0, 0, 0, ::16]
    assert torch.allclose(palette, torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]))
    assert torch.equal(images_to_uint8(palette), torch.tensor([0, 85, 170, 255], dtype=torch.uint8))


def test_encode_uses_patch_mean_and_nearest_level() -> None:
    tok = PaletteTokenizer(levels=3, patch=2)  # palette -1, 0, 1
    images = torch.full((1, 3, 2, 4), -1.0)
    images[0, :, 0, 0] = 1.0  # mean of the first block: -0.5 -> tie -> darker level
    images[0, 0, :, 2:] = 0.9  # second block: channel mean (0.9 - 2) / 3 ~ -0.37 -> level 1
    assert tok.encode(images).tolist() == [[[0, 1]]]


def test_module_moves_with_to() -> None:
    tok = PaletteTokenizer(8).to("cpu", torch.float64)  # float buffers follow .to(dtype) too
    tokens = torch.randint(0, 8, (1, 2, 2))
    assert torch.equal(tok.encode(tok.decode(tokens).float()), tokens)
    assert tok.encode(tok.decode(tokens)).device == tok.palette.device


@pytest.mark.parametrize(
    "images, error",
    [
        (torch.zeros(1, 1, 16, 16), ValueError),  # not RGB
        (torch.zeros(3, 16, 16), ValueError),  # not 4-D
        (torch.zeros(1, 3, 16, 24), ValueError),  # not a multiple of the patch
        (torch.zeros(1, 3, 16, 16, dtype=torch.uint8), TypeError),  # uint8, not [-1, 1] floats
        (torch.full((1, 3, 16, 16), 1.5), ValueError),  # out of range
        (torch.full((1, 3, 16, 16), float("nan")), ValueError),
    ],
)
def test_encode_rejects_bad_images(images: torch.Tensor, error: type) -> None:
    with pytest.raises(error):
        PaletteTokenizer().encode(images)


@pytest.mark.parametrize(
    "tokens, error",
    [
        (torch.zeros(2, 15, dtype=torch.long), ValueError),  # N not square
        (torch.zeros(2, 2, 2, 2, dtype=torch.long), ValueError),
        (torch.zeros(1, 2, 2), TypeError),  # float
        (torch.full((1, 2, 2), 4), ValueError),  # >= levels
        (torch.full((1, 2, 2), -1), ValueError),
    ],
)
def test_decode_rejects_bad_tokens(tokens: torch.Tensor, error: type) -> None:
    with pytest.raises(error):
        PaletteTokenizer(4).decode(tokens)


@pytest.mark.parametrize("kwargs", [{"levels": 1}, {"levels": 2.0}, {"patch": 0}, {"levels": True}])
def test_constructor_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        PaletteTokenizer(**kwargs)
