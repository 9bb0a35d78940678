"""FSDP2 training, the EMA and sharded checkpoints (lpd.parallel): FSDP equals DDP, SIGTERM + --resume is
bit-identical, a save killed half-way keeps the last good checkpoint, the EMA is the hand-computed
average and survives resume, and sharded checkpoints consolidate to the released single-file format."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from conftest import run_process
from safetensors.torch import load_file
from test_train import (  # noqa: F401 (a fixture)
    HELD_MAIN,
    ROOT,
    TINY,
    Tokens,
    _released_cache,
    _torchrun,
    one_thread,
    run_preempted,
    tiny_config,
)
from torch.distributed.checkpoint import HuggingFaceStorageWriter

import lpd.export as C
import main_train
from lpd.files import CheckpointError, load_checkpoint, state_dict_digest
from lpd.models import load_lpd
from lpd.parallel import full_tensors
from lpd.sampling import SamplingConfig
from lpd.train import build_model, train


def quiet(msg: str) -> None:
    pass


@pytest.fixture()
def fsdp_group(one_thread):  # noqa: F811 - the imported fixture
    """One thread, and no process group left behind by a one-process FSDP run."""
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# ---------------------------------------------------------------------------------------------- one process


def test_fsdp_on_one_process_trains_as_plain_training_with_or_without_grad_checkpointing(
    tmp_path, fsdp_group
):
    runs = {
        name: train(
            tiny_config(tmp_path / name, ema_decay=0.9, **kw), dataset=Tokens(8, 16), log=quiet
        )
        for name, kw in (
            ("plain", {}),
            ("fsdp", {"fsdp": True}),
            ("ckpt", {"fsdp": True, "grad_checkpointing": True}),
        )
    }
    ref, ref_ema = runs["plain"].model.state_dict(), runs["plain"].ema
    for name in ("fsdp", "ckpt"):
        assert _max_diff(full_tensors(runs[name].model.state_dict()), ref) < 1e-6, name
        assert _max_diff(full_tensors(runs[name].ema), ref_ema) < 1e-6, name
    assert (
        _max_diff(ref, build_model(tiny_config(tmp_path), log=quiet).state_dict()) > 1e-3
    )  # the weights moved


def test_sharded_checkpoint_is_pickle_free_and_consolidates_to_the_released_format(
    tmp_path, fsdp_group, capsys
):
    result = train(
        tiny_config(tmp_path, fsdp=True, ema_decay=0.9, save_every_epochs=1),
        dataset=Tokens(8, 16),
        log=quiet,
    )
    out = tmp_path / "out"
    assert sorted(os.listdir(out / "checkpoint-last")) == [
        "shard-00001-model-00001-of-00001.safetensors",
        "state.pth",
    ]
    assert {"checkpoint-0", "checkpoint-1", "checkpoint-last"} <= set(os.listdir(out))
    shard = load_file(out / "checkpoint-last" / "shard-00001-model-00001-of-00001.safetensors")
    assert {k.split(".")[0] for k in shard} == {"model", "model_ema", "optim"}
    weights, ema = full_tensors(result.model.state_dict()), full_tensors(result.ema)
    ck = load_checkpoint(out / "checkpoint-last")  # whole tensors, without a process group
    assert (ck["epoch"], ck["step"], ck["global_step"]) == (1, 2, 4) and "optimizer" not in ck
    assert _max_diff(ck["model"], weights) == 0 and _max_diff(ck["model_ema"], ema) == 0
    # python -m lpd.checkpoint consolidate RUN_DIR out.pth -> what main_eval.py and the released loader read
    assert C.main(["consolidate", str(out), str(tmp_path / "c.pth")]) == 0
    flat = torch.load(tmp_path / "c.pth", weights_only=True)
    assert _max_diff(flat["model"], weights) == 0 and flat["model_config"]["embed_dim"] == 64
    assert _max_diff(load_lpd(tmp_path / "c.pth", ema=True).state_dict(), ema) == 0
    assert _max_diff(load_lpd(out / "checkpoint-1").state_dict(), weights) == 0
    capsys.readouterr()
    assert C.main(["consolidate", str(out), str(tmp_path / "c.pth")]) == 2
    assert "exists; --overwrite" in capsys.readouterr().err
    train(tiny_config(tmp_path / "ddp", epochs=1), dataset=Tokens(8, 16), log=quiet)
    assert C.main(["consolidate", str(tmp_path / "ddp" / "out"), str(tmp_path / "d.pth")]) == 2
    assert "is a folder but not a sharded checkpoint (no state.pth)" in capsys.readouterr().err
    # as `python -m lpd.checkpoint` (its __main__ module): the same one line, no traceback
    cmd = [
        sys.executable,
        "-m",
        "lpd.checkpoint",
        "consolidate",
        str(tmp_path / "ddp" / "out"),
        str(tmp_path / "d.pth"),
    ]
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: "), proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "is a folder but not a sharded checkpoint (no state.pth)" in proc.stderr


def test_a_save_killed_half_way_keeps_the_last_good_checkpoint(tmp_path, fsdp_group, monkeypatch):
    cfg = dict(fsdp=True, ema_decay=0.9, save_every_steps=1, epochs=2)
    ref = train(tiny_config(tmp_path / "ref", **cfg), dataset=Tokens(8, 16), log=quiet)
    ref_sd, ref_ema = full_tensors(ref.model.state_dict()), full_tensors(ref.ema)
    real, calls = HuggingFaceStorageWriter.write_data, {"n": 0}

    def dies_half_way(
        self, plan, planner
    ):  # the second save: half of the shard file, then the process "dies"
        calls["n"] += 1
        fut = real(self, plan, planner)
        if calls["n"] == 2:
            fut.wait()
            for name in os.listdir(self.path):
                with open(os.path.join(self.path, name), "r+b") as f:
                    f.truncate(os.path.getsize(f.name) // 2)
            raise OSError("killed mid-save")
        return fut

    monkeypatch.setattr(HuggingFaceStorageWriter, "write_data", dies_half_way)
    out = tmp_path / "run" / "out"
    with pytest.raises(
        CheckpointError,
        match="failed \\(OSError: killed mid-save\\); the last good checkpoint is kept",
    ):
        train(tiny_config(tmp_path / "run", **cfg), dataset=Tokens(8, 16), log=quiet)
    monkeypatch.setattr(HuggingFaceStorageWriter, "write_data", real)
    assert load_checkpoint(out / "checkpoint-last")["global_step"] == 1
    assert sorted(os.listdir(out)) == [
        "checkpoint-last",
        "config.yaml",
        "log.txt",
    ]  # no half-written folder left
    # The swap itself interrupted (old folder moved aside, new one not yet in place): the old one is found.
    real_replace = os.replace

    def dies_between_renames(src, dst, *a, **k):
        if os.path.basename(dst) == "checkpoint-last" and os.path.basename(src).startswith(".tmp-"):
            raise OSError("killed while swapping")
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", dies_between_renames)
    with pytest.raises(OSError, match="killed while swapping"):
        train(
            tiny_config(tmp_path / "run", resume=str(out), **cfg), dataset=Tokens(8, 16), log=quiet
        )
    monkeypatch.setattr(os, "replace", real_replace)
    assert (
        not (out / "checkpoint-last").exists()
        and load_checkpoint(out / "checkpoint-last.old")["global_step"] == 1
    )
    done = train(
        tiny_config(tmp_path / "run", resume=str(out), **cfg), dataset=Tokens(8, 16), log=quiet
    )
    assert done.global_step == 4 and not (out / "checkpoint-last.old").exists()
    assert (
        _max_diff(full_tensors(done.model.state_dict()), ref_sd) == 0
        and _max_diff(full_tensors(done.ema), ref_ema) == 0
    )


def test_ema_is_the_hand_computed_average_and_resumes_exactly(tmp_path, fsdp_group, monkeypatch):
    decay, seen = 0.8, []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *a, **k):
        if not seen:
            seen.append(
                {
                    n: p.detach().clone()
                    for n, p in zip(names, (p for g in self.param_groups for p in g["params"]))
                }
            )
        out = real_step(self, *a, **k)
        seen.append(
            {
                n: p.detach().clone()
                for n, p in zip(names, (p for g in self.param_groups for p in g["params"]))
            }
        )
        return out

    model = build_model(
        tiny_config(tmp_path), log=quiet
    )  # the optimizer's parameters in order, by name
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)] for g in model.param_groups(0.02) for p in g["params"]]
    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    full = train(
        tiny_config(tmp_path / "a", ema_decay=decay, epochs=3), dataset=Tokens(8, 16), log=quiet
    )
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert len(seen) == 7  # the initial weights, then after each of the 6 steps
    expected = dict(seen[0])
    for weights in seen[1:]:
        expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in expected}
    assert (
        _max_diff(full.ema, expected) < 1e-6 and _max_diff(full.ema, seen[-1]) > 1e-3
    )  # lerp rounds differently
    assert (
        _max_diff(
            load_checkpoint(tmp_path / "a" / "out" / "checkpoint-last.pth")["model_ema"], full.ema
        )
        == 0
    )
    # stopped after epoch 0 and resumed: the same EMA, bit for bit
    train(tiny_config(tmp_path / "b", ema_decay=decay, epochs=1), dataset=Tokens(8, 16), log=quiet)
    resumed = train(
        tiny_config(tmp_path / "b", ema_decay=decay, epochs=3, resume=str(tmp_path / "b" / "out")),
        dataset=Tokens(8, 16),
        log=quiet,
    )
    assert (
        _max_diff(resumed.ema, full.ema) == 0
        and _max_diff(resumed.model.state_dict(), full.model.state_dict()) == 0
    )
    # a checkpoint without an EMA: the EMA restarts from the resumed weights, with a warning
    logs = []
    train(tiny_config(tmp_path / "c", epochs=1), dataset=Tokens(8, 16), log=quiet)
    train(
        tiny_config(tmp_path / "c", ema_decay=decay, epochs=2, auto_resume=True),
        dataset=Tokens(8, 16),
        log=logs.append,
    )
    assert any("holds no EMA weights" in m for m in logs)


def test_resuming_without_ema_decay_continues_the_ema_and_ema_decay_0_drops_it(
    tmp_path, fsdp_group
):
    for fsdp in (False, True):
        a, b, data = tmp_path / f"a{fsdp}", tmp_path / f"b{fsdp}", Tokens(8, 16)
        full = train(tiny_config(a, ema_decay=0.8, epochs=3, fsdp=fsdp), dataset=data, log=quiet)
        train(tiny_config(b, ema_decay=0.8, epochs=1, fsdp=fsdp), dataset=data, log=quiet)
        logs = []
        resumed = train(
            tiny_config(b, epochs=3, fsdp=fsdp, auto_resume=True), dataset=data, log=logs.append
        )  # no ema_decay
        assert any("continues with decay 0.8" in m for m in logs), logs
        assert _max_diff(full_tensors(resumed.ema), full_tensors(full.ema)) == 0
        last = load_checkpoint(b / "out" / ("checkpoint-last" if fsdp else "checkpoint-last.pth"))
        assert last["args"]["ema_decay"] == 0.8
        assert _max_diff(last["model_ema"], full_tensors(full.ema)) == 0
    logs = []
    dropped = train(
        tiny_config(b, epochs=4, fsdp=True, ema_decay=0.0, auto_resume=True),
        dataset=Tokens(8, 16),
        log=logs.append,
    )
    assert dropped.ema is None and any("--ema_decay 0 drops the EMA weights" in m for m in logs)
    assert "model_ema" not in load_checkpoint(b / "out" / "checkpoint-last")


def test_evaluation_during_training_samples_the_ema_or_the_whole_fsdp_model(tmp_path, fsdp_group):
    vq = dict(
        ch=32, ch_mult=[1, 1, 1, 1, 1], z_channels=8, codebook_size=16384, codebook_embed_dim=8
    )
    kw = dict(
        epochs=1,
        eval_freq=1,
        eval_num_images=2,
        eval_bsz=2,
        sampling=SamplingConfig(cfg=1.0),
        ema_decay=0.9,
        eval_group_sizes="[1, 3, 5, 7]",
        vq_config=vq,
    )
    for name, extra, folder in (
        ("ema", {"eval_use_ema": True}, "eval-epoch0-ema-cfg1"),
        ("fsdp", {"fsdp": True}, "eval-epoch0-cfg1"),
    ):
        result = train(
            tiny_config(tmp_path / name, **kw, **extra), dataset=Tokens(8, 16), log=quiet
        )
        evaluated = full_tensors(result.ema if name == "ema" else result.model.state_dict())
        run = tmp_path / name / "out" / folder
        assert json.loads((run / "metrics.json").read_text())["settings"][
            "weights_sha256"
        ] == state_dict_digest(evaluated)
        assert len(os.listdir(run / "images")) == 2


def test_bad_fsdp_and_ema_settings_are_refused_before_training(tmp_path, fsdp_group, capsys):
    base = [
        "--config",
        TINY,
        "--use_cached",
        "--cached_path",
        str(tmp_path),
        "--device",
        "cpu",
        "--output_dir",
        str(tmp_path / "o"),
    ]
    for extra, says in (
        (["--cpu_offload"], "--cpu_offload offloads FSDP shards: add --fsdp"),
        (["--fsdp", "--cpu_offload"], "this run is on cpu: drop it"),
        (["--eval_use_ema"], "--eval_use_ema evaluates the EMA weights: give --ema_decay"),
        (["--ema_decay", "1.0"], "--ema_decay must be in [0, 1)"),
    ):
        assert main_train.main(base + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and says in err and "Traceback" not in err
    train(tiny_config(tmp_path / "d", epochs=1), dataset=Tokens(8, 16), log=quiet)
    with pytest.raises(CheckpointError, match="single-file \\(DDP\\) checkpoint; drop --fsdp"):
        train(
            tiny_config(
                tmp_path / "d",
                epochs=2,
                fsdp=True,
                auto_resume=True,
                overwrite=True,
                resume=str(tmp_path / "d" / "out" / "checkpoint-last.pth"),
            ),
            dataset=Tokens(8, 16),
            log=quiet,
        )
    train(tiny_config(tmp_path / "f", epochs=1, fsdp=True), dataset=Tokens(8, 16), log=quiet)
    with pytest.raises(CheckpointError, match="sharded \\(--fsdp\\) checkpoint folder; add --fsdp"):
        train(
            tiny_config(tmp_path / "f", epochs=2, resume=str(tmp_path / "f" / "out")),
            dataset=Tokens(8, 16),
            log=quiet,
        )


# ---------------------------------------------------------------------------------------------- torchrun


def _shards(folder) -> dict[str, torch.Tensor]:
    return {
        f"{n}:{k}": v
        for n in sorted(os.listdir(folder))
        if n.endswith(".safetensors")
        for k, v in load_file(folder / n).items()
    }


@pytest.mark.timeout(1200)
def test_torchrun_fsdp_equals_ddp_and_sigterm_resume_is_bit_identical(tmp_path):
    cache = _released_cache(
        tmp_path / "cache", n=8
    )  # 2 processes x batch 2: 2 steps per epoch, 6 in all
    common = [
        "--config",
        TINY,
        "--use_cached",
        "--cached_path",
        str(cache),
        "--epochs",
        "3",
        "--batch_size",
        "2",
        "--save_every_steps",
        "2",
        "--seed",
        "0",
        "--lr",
        "2e-3",
        "--warmup_epochs",
        "0",
        "--ema_decay",
        "0.9",
        "--num_workers",
        "0",
    ]

    def run(out, *extra):
        cmd, env = _torchrun(
            [
                os.path.join(ROOT, "main_train.py"),
                *common,
                "--output_dir",
                str(tmp_path / out),
                *extra,
            ]
        )
        proc = run_process(cmd, 600, env=env, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    run("ddp")
    run("fsdp", "--fsdp")
    ddp, fsdp = (
        load_checkpoint(tmp_path / "ddp" / "checkpoint-last.pth"),
        load_checkpoint(tmp_path / "fsdp" / "checkpoint-last"),
    )
    assert (fsdp["epoch"], fsdp["step"], fsdp["global_step"]) == (2, 2, 6)
    assert (
        _max_diff(fsdp["model"], ddp["model"]) < 1e-5
        and _max_diff(fsdp["model_ema"], ddp["model_ema"]) < 1e-5
    )
    assert (
        _max_diff(fsdp["model"], fsdp["model_ema"]) > 1e-4
    )  # the EMA lags the weights, which moved

    # SIGTERM to torchrun once the first sharded checkpoint exists (the run held there), then --resume:
    # the same shards, bit for bit.
    held = tmp_path / "held.py"
    held.write_text(HELD_MAIN.format(root=ROOT, held=str(tmp_path / "b.held")))
    cmd, env = _torchrun([str(held), *common, "--output_dir", str(tmp_path / "b"), "--fsdp"])
    text = run_preempted(cmd, env, tmp_path, "b")
    assert "preempted: saved" in text, text[-3000:]
    stopped = load_checkpoint(tmp_path / "b" / "checkpoint-last")
    assert stopped["global_step"] == 3, (
        "the run was not stopped one step after its first checkpoint"
    )
    resumed = run("b", "--fsdp", "--resume", str(tmp_path / "b"))
    assert f"resumed from {tmp_path / 'b' / 'checkpoint-last'}" in resumed.stdout
    a, b = (
        _shards(tmp_path / "fsdp" / "checkpoint-last"),
        _shards(tmp_path / "b" / "checkpoint-last"),
    )
    assert (
        len(a) > 0 and set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    )  # model, AdamW moments, EMA
