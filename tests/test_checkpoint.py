"""Safe checkpoint loading (released format), strict key checks, interpolation, atomic writes."""

from __future__ import annotations

import argparse
import os
import pickle

import pytest
import torch

from lpd.checkpoint import (
    CheckpointError,
    interpolate_pos_embed,
    load_checkpoint,
    load_into,
    load_state_dict,
    save_checkpoint,
)
from lpd.models import build_lpd, load_lpd, lpd_tiny


def released_checkpoint(path, model, args=None):
    """A file laid out as the released training code writes it."""
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95)}]},
            "epoch": 449,
            "scaler": {"scale": 65536.0, "growth_factor": 2.0},
            "args": args or argparse.Namespace(model="lpd_tiny", img_size=256, cfg=4.8, group_sizes="[1]*256"),
        },
        path,
    )


def test_released_format_loads_strictly(tmp_path):
    model = lpd_tiny(img_size=256)
    path = tmp_path / "lpd_tiny_256.pth"
    released_checkpoint(path, model)
    sd = load_state_dict(path)
    assert set(sd) == set(model.state_dict())
    loaded = load_lpd(path, model="lpd_tiny", img_size=256)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    # Without --model, the architecture is read from the released 'args'.
    assert load_lpd(path).config.embed_dim == 64
    assert not loaded.training


def test_bare_state_dict_and_project_checkpoint(tmp_path):
    model = build_lpd(img_size=64, embed_dim=32, depth=1, num_heads=2, vocab_size=16, class_num=4)
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    assert set(load_state_dict(tmp_path / "bare.pth")) == set(model.state_dict())
    save_checkpoint({"model": model.state_dict(), "model_config": model.config.to_dict()}, tmp_path / "ours.pth")
    again = load_lpd(tmp_path / "ours.pth")
    assert again.config == model.config


def test_arbitrary_pickled_objects_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": {}, "payload": Evil()}, f)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint(path)


def test_missing_file_and_garbage(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state_dict(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="could not load"):
        load_state_dict(tmp_path / "junk.pth")
    torch.save({"something": 1}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="no 'model' entry"):
        load_state_dict(tmp_path / "odd.pth")


def test_strict_check_lists_missing_unexpected_and_mismatched(tmp_path):
    model = lpd_tiny(img_size=256)
    sd = model.state_dict()
    del sd["blocks.1.mlp.fc2.bias"]
    sd["extra.weight"] = torch.zeros(3)
    sd["head.weight"] = torch.zeros(100, 64)
    with pytest.raises(CheckpointError) as err:
        load_into(lpd_tiny(img_size=256), sd)
    msg = str(err.value)
    assert "missing keys (1): blocks.1.mlp.fc2.bias" in msg
    assert "unexpected keys (1): extra.weight" in msg
    assert "head.weight: checkpoint [100, 64] vs model [16384, 64]" in msg


def test_wrong_model_for_checkpoint(tmp_path):
    path = tmp_path / "tiny.pth"
    released_checkpoint(path, lpd_tiny(img_size=256))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_lpd(path, model="lpd_l", img_size=256)


def test_wrong_img_size_and_interpolation_on_request(tmp_path):
    model = lpd_tiny(img_size=256)
    path = tmp_path / "tiny.pth"
    released_checkpoint(path, model)
    with pytest.raises(CheckpointError, match="trained at 256 px"):
        load_lpd(path, model="lpd_tiny", img_size=512)
    big = load_lpd(path, model="lpd_tiny", img_size=512, interpolate=True)
    assert big.pos_embed.shape == (1, 1025, 64)
    assert torch.equal(big.pos_embed[0, 0], model.pos_embed[0, 0])
    assert torch.equal(big.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


def test_interpolate_pos_embed_values():
    grid = torch.arange(16.0).reshape(4, 4)
    pe = torch.cat([torch.full((1, 1, 2), -7.0), torch.stack([grid, grid], -1).reshape(1, 16, 2)], dim=1)
    out = interpolate_pos_embed(pe, 64)
    assert out.shape == (1, 65, 2)
    assert torch.equal(out[:, 0], pe[:, 0])
    # A constant field stays constant; the same grid comes back unchanged.
    const = torch.ones(1, 17, 3)
    assert torch.allclose(interpolate_pos_embed(const, 64), torch.ones(1, 65, 3), atol=1e-6)
    assert interpolate_pos_embed(pe, 16) is pe
    with pytest.raises(ValueError, match="square grids"):
        interpolate_pos_embed(pe, 20)


def test_atomic_save_never_corrupts_existing_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-last.pth"
    save_checkpoint({"model": {"w": torch.ones(3)}, "epoch": 1}, path)

    real_save = torch.save

    def broken_save(obj, f, *a, **kw):
        f.write(b"partial bytes")
        raise KeyboardInterrupt("preempted mid-write")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "epoch": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-last.pth"]  # no temp files left


def test_non_finite_weights_are_refused_by_name(tmp_path):
    model = lpd_tiny(img_size=64)
    sd = model.state_dict()
    sd["blocks.1.mlp.fc1.weight"][3, 4] = float("nan")
    torch.save({"model": sd, "model_config": model.config.to_dict()}, tmp_path / "nan.pth")
    with pytest.raises(CheckpointError, match="non-finite weights .* blocks.1.mlp.fc1.weight"):
        load_lpd(tmp_path / "nan.pth")
