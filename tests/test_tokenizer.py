"""Tests for :mod:`lpd.tokenizer`: parity with LlamaGen's VQ, the released key layout, loading, errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from lpd.files import CheckpointError
from lpd.tokenizer import VQModel, build_vq, load_vq, make_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def parity() -> dict:
    return torch.load(FIXTURES / "vq_parity_tiny.pt", weights_only=True)


# ---------------------------------------------------------------------------------------- parity
def test_encode_matches_reference_indices(tiny_vq: VQModel, parity: dict) -> None:
    idx = tiny_vq.encode(parity["image"])
    assert idx.dtype == torch.long and idx.shape == (2, 4, 4)
    assert torch.equal(idx.reshape(-1), parity["indices"])


def test_quantized_latent_matches_reference(tiny_vq: VQModel, parity: dict) -> None:
    with torch.no_grad():
        quant, idx = tiny_vq.encode_to_quant(parity["image"])
    assert quant.shape == parity["quant"].shape
    torch.testing.assert_close(quant, parity["quant"], atol=1e-5, rtol=0)
    assert torch.equal(idx.reshape(-1), parity["indices"])


def test_decode_matches_reference(tiny_vq: VQModel, parity: dict) -> None:
    with torch.no_grad():
        out = tiny_vq.decode(parity["indices"].reshape(2, 4, 4))
        out_flat = tiny_vq.decode(parity["indices"].reshape(2, 16))  # [B, h*w], square grid
    assert out.shape == (2, 3, 64, 64) and out.dtype == torch.float32
    torch.testing.assert_close(out, parity["decoded"], atol=1e-4, rtol=0)
    assert torch.equal(out, out_flat)


def test_attributes(tiny_vq: VQModel) -> None:
    assert tiny_vq.downsample_factor == 16
    assert tiny_vq.codebook_size == 256
    assert (
        build_vq(ch=32, ch_mult=(1, 2, 2, 4), z_channels=64, codebook_size=64).downsample_factor
        == 8
    )


def test_follows_module_dtype(parity: dict) -> None:
    vq = build_vq(**parity["config"]).double().eval()
    vq.load_state_dict({k: v.double() for k, v in parity["state_dict"].items()})
    idx = vq.encode(parity["image"])  # float32 input, float64 module
    assert torch.equal(idx.reshape(-1), parity["indices"])
    with torch.no_grad():
        out = vq.decode(idx)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), parity["decoded"], atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------- released layout
def test_full_size_state_dict_matches_manifest() -> None:
    manifest = json.loads((FIXTURES / "state_dict_manifest.json").read_text())["vq_ds16_c2i"]
    with torch.device("meta"):
        vq = build_vq()
    got = {k: list(v.shape) for k, v in vq.state_dict().items()}
    assert sorted(got) == sorted(manifest)
    assert got == {k: list(v) for k, v in manifest.items()}
    assert got["quantize.codebook_used"] == [65536]
    assert vq.downsample_factor == 16 and vq.codebook_size == 16384


def test_parity_state_dict_keys_match_build(parity: dict, tiny_vq: VQModel) -> None:
    assert set(tiny_vq.state_dict()) == set(parity["state_dict"])


# ------------------------------------------------------------------------------------- loading
def test_load_vq_released_format_round_trip(tmp_path: Path, parity: dict) -> None:
    path = tmp_path / "vq.pt"
    torch.save({"model": parity["state_dict"]}, path)
    vq = load_vq(path, **parity["config"])
    assert not vq.training
    assert torch.equal(vq.encode(parity["image"]).reshape(-1), parity["indices"])
    for k, v in parity["state_dict"].items():
        assert torch.equal(vq.state_dict()[k], v), k


def test_load_vq_bare_state_dict_and_training_extras(tmp_path: Path, parity: dict) -> None:
    bare = tmp_path / "bare.pt"
    torch.save(parity["state_dict"], bare)
    full = tmp_path / "full.pt"
    torch.save(
        {"model": parity["state_dict"], "steps": 10, "args": argparse.Namespace(vq_model="VQ-16")},
        full,
    )
    for path in (bare, full):
        vq = load_vq(path, **parity["config"])
        assert not vq.training and vq.state_dict().keys() == parity["state_dict"].keys()
        assert all(torch.equal(vq.state_dict()[k], v) for k, v in parity["state_dict"].items())
        assert torch.equal(vq.encode(parity["image"]).reshape(-1), parity["indices"])


def test_load_vq_missing_key_is_named(tmp_path: Path, parity: dict) -> None:
    sd = dict(parity["state_dict"])
    del sd["quantize.codebook_used"]
    path = tmp_path / "missing.pt"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match=r"missing keys.*quantize\.codebook_used"):
        load_vq(path, **parity["config"])


def test_load_vq_unexpected_key_is_named(tmp_path: Path, parity: dict) -> None:
    sd = dict(parity["state_dict"])
    sd["quantize.extra"] = torch.zeros(3)
    path = tmp_path / "extra.pt"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match=r"unexpected keys.*quantize\.extra"):
        load_vq(path, **parity["config"])


def test_load_vq_shape_mismatch_is_named(tmp_path: Path, parity: dict) -> None:
    path = tmp_path / "shape.pt"
    torch.save({"model": parity["state_dict"]}, path)
    cfg = dict(parity["config"], codebook_size=512)  # wrong config for this checkpoint
    with pytest.raises(CheckpointError, match=r"shape mismatches.*quantize\.embedding\.weight"):
        load_vq(path, **cfg)


# -------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "shape, pattern",
    [
        ((1, 3, 60, 64), "multiples of the downsampling factor 16"),
        ((1, 3, 64, 40), "multiples of the downsampling factor 16"),
        ((1, 4, 64, 64), "3 \\(RGB\\) channels"),
        ((1, 1, 64, 64), "3 \\(RGB\\) channels"),
        ((3, 64, 64), "shape \\[B, 3, H, W\\]"),
    ],
)
def test_encode_rejects_bad_images(tiny_vq: VQModel, shape: tuple, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        tiny_vq.encode(torch.zeros(shape))


@pytest.mark.parametrize("bad", [256, -1, 10_000])
def test_decode_rejects_out_of_range_tokens(tiny_vq: VQModel, bad: int) -> None:
    tokens = torch.zeros(1, 4, 4, dtype=torch.long)
    tokens[0, 1, 2] = bad
    with pytest.raises(ValueError, match=r"token indices must lie in \[0, 255\]"):
        tiny_vq.decode(tokens)


def test_decode_rejects_bad_token_shapes_and_dtypes(tiny_vq: VQModel) -> None:
    with pytest.raises(ValueError, match="square grid"):
        tiny_vq.decode(torch.zeros(1, 12, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, h, w\] or \[B, h\*w\]"):
        tiny_vq.decode(torch.zeros(16, dtype=torch.long))
    with pytest.raises(TypeError, match="integer tensor"):
        tiny_vq.decode(torch.zeros(1, 4, 4))


def test_load_vq_missing_file_points_to_download(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="FoundationVision/LlamaGen"):
        load_vq(tmp_path / "vq_ds16_c2i.pt")


def test_make_tokenizer_names_unknown_config_keys() -> None:
    with pytest.raises(
        ValueError, match=r"--vq_config: unknown keys \['chh'\] for the vq tokenizer; use \['ch', "
    ):
        make_tokenizer("vq", None, {"chh": 32})
    with pytest.raises(ValueError, match=r"unknown keys \['lev'\] for the palette tokenizer"):
        make_tokenizer("palette", None, {"lev": 3})
    with pytest.raises(ValueError, match="--tokenizer: unknown tokenizer 'vqgan'"):
        make_tokenizer("vqgan")
    assert make_tokenizer("palette", None, {"levels": 3}).codebook_size == 3
