"""Safe checkpoint loading (released format), strict key checks, interpolation, atomic writes, and
exports (safetensors + config + model card) read back by load_lpd, the pipeline and main_eval.py."""

from __future__ import annotations

import argparse
import os
import pickle

import numpy as np
import pytest
import torch

from lpd.files import CheckpointError, load_checkpoint, load_into, load_state_dict, save_checkpoint
from lpd.models import build_lpd, interpolate_pos_embed, load_lpd, lpd_tiny, read_weights


def released_checkpoint(path, model, args=None):
    """A file laid out as the released training code writes it."""
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95)}]},
            "epoch": 449,
            "scaler": {"scale": 65536.0, "growth_factor": 2.0},
            "args": args
            or argparse.Namespace(model="lpd_tiny", img_size=256, cfg=4.8, group_sizes="[1]*256"),
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
    save_checkpoint(
        {"model": model.state_dict(), "model_config": model.config.to_dict()}, tmp_path / "ours.pth"
    )
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
    pe = torch.cat(
        [torch.full((1, 1, 2), -7.0), torch.stack([grid, grid], -1).reshape(1, 16, 2)], dim=1
    )
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


# ---------------------------------------------------------------------------------------------- export


TINY_VQ = dict(ch=32, ch_mult=[1, 1, 1, 1, 1], z_channels=8, codebook_size=64, codebook_embed_dim=8)


def _trained_checkpoint(path, seed=0):
    """A checkpoint as lpd.train writes it (weights, EMA, config, arguments) for a 16-token model."""
    from lpd.train import TrainConfig

    model = build_lpd(img_size=64, embed_dim=32, depth=2, num_heads=2, vocab_size=64, class_num=10)
    model.initialize_weights(torch.Generator().manual_seed(seed))
    ema = {k: v + 0.01 for k, v in model.state_dict().items()}
    args = TrainConfig(
        model=None, img_size=64, model_config=model.config.to_dict(), vq_config=TINY_VQ, seed=seed
    ).to_dict()
    save_checkpoint(
        {
            "model": model.state_dict(),
            "model_ema": ema,
            "model_config": model.config.to_dict(),
            "args": args,
            "epoch": 4,
            "step": 0,
            "global_step": 50,
        },
        path,
    )
    return model, ema


def _logits(model):
    g = torch.Generator().manual_seed(0)
    tokens, orders = (
        torch.randint(0, 64, (3, 16), generator=g),
        torch.rand(3, 16, generator=g).argsort(1),
    )
    return model.logits(tokens, torch.tensor([1, 2, 3]), orders, [1, 3, 5, 7])


def test_export_loads_back_with_identical_logits_without_pickle(tmp_path, monkeypatch, capsys):
    import json
    import shutil

    from lpd.checkpoint import main

    model, ema = _trained_checkpoint(tmp_path / "ck.pth")
    assert main(["export", str(tmp_path / "ck.pth"), str(tmp_path / "raw")]) == 0
    assert main(["export", str(tmp_path / "ck.pth"), str(tmp_path / "ema"), "--use_ema"]) == 0
    assert sorted(os.listdir(tmp_path / "raw")) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((tmp_path / "raw" / "config.json").read_text())
    assert (
        config["model_config"] == model.config.to_dict()
        and config["img_size"] == 64
        and config["weights"] == "model"
    )
    assert (
        config["tokenizer"]["vq_config"]["codebook_size"] == 64
        and config["training"]["global_step"] == 50
    )
    assert config["training"]["args"]["vq_config"]["ch"] == 32
    # reading an export unpickles nothing: torch.load and pickle are off limits
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, lambda *a, **k: pytest.fail("pickle was used"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was used"))
    with torch.no_grad():
        assert torch.equal(_logits(load_lpd(tmp_path / "raw")), _logits(model.eval()))
        assert all(
            torch.equal(v, ema[k])
            for k, v in load_lpd(tmp_path / "ema", ema=True).state_dict().items()
        )
    with pytest.raises(CheckpointError, match="not an EMA; drop --use_ema"):
        load_lpd(tmp_path / "raw", ema=True)
    monkeypatch.undo()
    # a config that does not describe the weights is refused with the differences
    for change, says in (
        ({"depth": 3}, "missing keys \\(12\\): blocks.2"),
        ({"embed_dim": 64}, "shape mismatches"),
    ):
        bad = tmp_path / f"bad{len(says)}"
        shutil.copytree(tmp_path / "raw", bad)
        (bad / "config.json").write_text(
            json.dumps({**config, "model_config": {**config["model_config"], **change}})
        )
        with pytest.raises(
            CheckpointError,
            match=f"does not match the model LPD:(.|\\n)*{says}(.|\\n)*config.json does not describe",
        ):
            load_lpd(bad)
    # an existing OUT_DIR is kept unless --overwrite
    capsys.readouterr()
    assert main(["export", str(tmp_path / "ck.pth"), str(tmp_path / "raw"), "--use_ema"]) == 2
    assert "exists; choose another folder, or --overwrite" in capsys.readouterr().err
    assert json.loads((tmp_path / "raw" / "config.json").read_text())["weights"] == "model"
    assert (
        main(
            ["export", str(tmp_path / "ck.pth"), str(tmp_path / "raw"), "--use_ema", "--overwrite"]
        )
        == 0
    )
    assert json.loads((tmp_path / "raw" / "config.json").read_text())["weights"] == "ema"
    assert (
        main(["export", str(tmp_path / "nope.pth"), str(tmp_path / "x")]) == 2
        and not (tmp_path / "x").exists()
    )


def test_export_deletes_nothing_it_did_not_write(tmp_path, capsys):
    import json

    from lpd.checkpoint import main

    run = (
        tmp_path / "run"
    )  # a training run: its checkpoint, a log, an earlier run's folder beside it
    run.mkdir()
    _trained_checkpoint(run / "checkpoint-last.pth")
    (run / "log.txt").write_text("epoch 4")
    (tmp_path / "exp.old").mkdir()
    (tmp_path / "exp.old" / "keep.txt").write_text("the user's")

    def snapshot():
        return {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    before = snapshot()
    for out, says in (
        (run, "holds the checkpoint"),
        (tmp_path / "exp.old", "not an export's (keep.txt)"),
        (run / "checkpoint-last.pth", "holds the checkpoint"),
    ):
        assert main(["export", str(run / "checkpoint-last.pth"), str(out), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: OUT_DIR") and says in err and "Traceback" not in err, err
    other = tmp_path / "other"  # another folder that holds a run
    other.mkdir()
    (other / "checkpoint-0.pth").write_bytes(b"weights")
    (other / "config.json").write_text('{"lr": 1}')
    assert main(["export", str(run / "checkpoint-last.pth"), str(other), "--overwrite"]) == 2
    assert "not an export's (checkpoint-0.pth)" in capsys.readouterr().err
    (other / "checkpoint-0.pth").unlink()
    assert (
        main(["export", str(run / "checkpoint-last.pth"), str(other), "--overwrite"]) == 2
    )  # config.json, not ours
    assert (
        "is not an earlier export" in capsys.readouterr().err
        and (other / "config.json").read_text() == '{"lr": 1}'
    )
    assert snapshot() == {**before, other / "config.json": b'{"lr": 1}'}
    # an earlier export is replaced file by file with --overwrite; what else is there stays
    exp = tmp_path / "exp"
    assert main(["export", str(run / "checkpoint-last.pth"), str(exp)]) == 0
    (exp / ".tmp-model.safetensors-x").write_bytes(b"left by a killed export")
    assert (
        main(["export", str(run / "checkpoint-last.pth"), str(exp), "--use_ema", "--overwrite"])
        == 0
    )
    assert json.loads((exp / "config.json").read_text())["weights"] == "ema"
    assert (exp / ".tmp-model.safetensors-x").exists() and (
        tmp_path / "exp.old" / "keep.txt"
    ).exists()
    assert {p: b for p, b in snapshot().items() if exp not in p.parents} == {
        **before,
        other / "config.json": b'{"lr": 1}',
    }
    (tmp_path / "empty").mkdir()  # an empty folder is written into
    assert main(["export", str(run / "checkpoint-last.pth"), str(tmp_path / "empty")]) == 0
    assert sorted(os.listdir(tmp_path / "empty")) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]


def test_model_card_metrics_and_push_to_hub(tmp_path, monkeypatch, capsys):
    import json

    import huggingface_hub

    from lpd.checkpoint import main
    from lpd.files import state_dict_digest

    model, _ = _trained_checkpoint(tmp_path / "ck.pth")
    metrics = {
        "fid": 3.21,
        "inception_score": 250.5,
        "num_images": 50000,
        "sampling": {"cfg": 4.8, "order": "lpd"},
        "settings": {"weights_sha256": state_dict_digest(model), "group_sizes": [1, 3, 5, 7]},
    }
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert (
        main(
            [
                "export",
                str(tmp_path / "ck.pth"),
                str(tmp_path / "out"),
                "--metrics",
                str(tmp_path / "metrics.json"),
            ]
        )
        == 0
    )
    card = (tmp_path / "out" / "README.md").read_text()
    assert (
        "| 3.21 | 250.5 | 50000 | 4 |" in card
        and "* cfg: 4.8" in card
        and "library_name: lpd" in card
    )
    assert (
        'LPDPipeline.from_pretrained("path/to/out")' in card and str(tmp_path) not in card
    )  # no local path
    # scores of other weights are refused; nothing is written
    (tmp_path / "other.json").write_text(
        json.dumps({**metrics, "settings": {"weights_sha256": "ab" * 32}})
    )
    capsys.readouterr()
    assert (
        main(
            [
                "export",
                str(tmp_path / "ck.pth"),
                str(tmp_path / "o2"),
                "--metrics",
                str(tmp_path / "other.json"),
            ]
        )
        == 2
    )
    assert "measured on other weights" in capsys.readouterr().err and not (tmp_path / "o2").exists()
    # --push_to_hub offline: a clear error before anything is written
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert (
        main(["export", str(tmp_path / "ck.pth"), str(tmp_path / "o3"), "--push_to_hub", "me/tiny"])
        == 2
    )
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err and not (tmp_path / "o3").exists()
    # online: the whole folder goes up in one commit; a failed upload leaves the folder complete
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    sent = []
    monkeypatch.setattr(
        huggingface_hub,
        "create_repo",
        lambda repo, **k: sent.append(("create", repo, k.get("private"))),
    )
    monkeypatch.setattr(
        huggingface_hub,
        "upload_folder",
        lambda repo_id, folder_path, **k: sent.append(
            ("upload", repo_id, sorted(os.listdir(folder_path)))
        ),
    )
    assert (
        main(
            [
                "export",
                str(tmp_path / "ck.pth"),
                str(tmp_path / "o4"),
                "--push_to_hub",
                "me/tiny",
                "--private",
            ]
        )
        == 0
    )
    assert sent == [
        ("create", "me/tiny", True),
        ("upload", "me/tiny", ["README.md", "config.json", "model.safetensors"]),
    ]
    assert 'from_pretrained("me/tiny")' in (tmp_path / "o4" / "README.md").read_text()

    def refused(**k):
        raise PermissionError("403 Forbidden: no write access to me/tiny")

    monkeypatch.setattr(huggingface_hub, "upload_folder", refused)
    capsys.readouterr()
    assert (
        main(["export", str(tmp_path / "ck.pth"), str(tmp_path / "o5"), "--push_to_hub", "me/tiny"])
        == 2
    )
    err = capsys.readouterr().err
    assert (
        "403 Forbidden" in err
        and "nothing was committed" in err
        and len(os.listdir(tmp_path / "o5")) == 3
    )


def test_export_from_a_hub_repository_through_load_lpd_pipeline_and_main_eval(
    tmp_path, monkeypatch
):
    import shutil

    from test_hub import fake_cache

    import main_eval
    from lpd.checkpoint import main
    from lpd.pipeline import LPDPipeline
    from lpd.tokenizer import make_tokenizer

    model, ema = _trained_checkpoint(tmp_path / "ck.pth")
    assert main(["export", str(tmp_path / "ck.pth"), str(tmp_path / "out")]) == 0
    cache = tmp_path / "hub"
    for name in ("config.json", "model.safetensors", "README.md"):
        shutil.copy(tmp_path / "out" / name, fake_cache(cache, "me/tiny", name))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert all(
        torch.equal(v, model.state_dict()[k]) for k, v in load_lpd("me/tiny").state_dict().items()
    )
    assert all(
        torch.equal(v, model.state_dict()[k]) for k, v in read_weights("me/tiny")[1].items()
    )  # --pretrained_ckpt
    pipe = LPDPipeline.from_pretrained(
        "me/tiny", device="cpu"
    )  # the tokenizer its config.json names
    ref = LPDPipeline(model, make_tokenizer("vq", None, TINY_VQ, seed=0))
    kw = dict(group_sizes=[1, 3, 5, 7], cfg=2.0, seed=3)
    assert np.array_equal(pipe([1, 2], **kw), ref([1, 2], **kw))
    with pytest.raises(FileNotFoundError, match="me/nothing(.|\\n)*it does not exist"):
        load_lpd("me/nothing")
    # main_eval.py --pretrained_ckpt: the folder, the Hub repository, and --use_ema of a checkpoint
    for ckpt, ema_flag, want, name in (
        (str(tmp_path / "out"), [], model.state_dict(), "out"),
        ("me/tiny", [], model.state_dict(), "tiny"),
        (str(tmp_path / "ck.pth"), ["--use_ema"], ema, "ck-ema"),
    ):
        args = main_eval.build_parser().parse_args(["--pretrained_ckpt", ckpt, *ema_flag])
        net, run = main_eval.load_model(args, torch.device("cpu"))
        assert run == name and all(torch.equal(v, want[k]) for k, v in net.state_dict().items())
