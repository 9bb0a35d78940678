"""README claims of training, checked against the released recipe's rules written out here (not
against the trainer): mirrored tokens with probability 0.5, one random order per sample, group sizes
drawn from every released table of the resolution, label dropout 0.1, AdamW (0.9, 0.95) with weight
decay on matrices only, lr = blr x global batch / 256 with warm-up and the schedules, gradient
clipping; and the exit status 75 after saving on SIGTERM and on SIGUSR1.

What the trainer did is read from outside: the batches handed to ``LPD.forward``, the gradient of
``class_emb`` (a dropped label gives its row no gradient), ``log.txt`` and the checkpoint.
Frequencies are checked with binomial or Hoeffding bounds that a correct recipe fails with
probability below 1e-9.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from scipy.stats import binom

from lpd.models import LPD
from lpd.schedules import group_sizes
from lpd.train import TrainConfig, build_model, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALPHA = 1e-9  # chance that a correct recipe fails a frequency check


@pytest.fixture(autouse=True)
def one_thread():
    """Small steps run fastest, and steadiest on a shared machine, on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def config(tmp_path, **kw) -> TrainConfig:
    base = dict(
        model=None,
        img_size=64,
        model_config=dict(embed_dim=16, depth=1, num_heads=2, vocab_size=8, class_num=2000),
        group_sizes_list="[1]*16; [1, 3, 5, 7]",
        num_workers=0,
        pin_mem=False,
        device="cpu",
        output_dir=str(tmp_path / "out"),
        seed=0,
        save_every_steps=0,
        save_every_epochs=0,
        log_freq=1,
        warmup_epochs=0,
        lr_schedule="constant",
    )
    return TrainConfig(**{**base, **kw})


class Marked(torch.utils.data.Dataset):
    """Sample i: tokens ``[2, N]`` (as is: all ``2 (i % 4)``, mirrored: all ``2 (i % 4) + 1``) and
    label ``i``."""

    def __init__(self, n: int, num_tokens: int) -> None:
        first = 2 * (torch.arange(n) % 4)
        self.tokens = (
            (first[:, None, None] + torch.arange(2)[None, :, None]).expand(n, 2, num_tokens).clone()
        )

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int):
        return self.tokens[i], i


class Recorder:
    """What ``LPD.forward`` is given per step, and which ``class_emb`` rows get a gradient."""

    def __init__(self, monkeypatch) -> None:
        self.batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]] = []
        self.class_rows: list[torch.Tensor] = []
        hooked: set[int] = set()
        real = LPD.forward

        def forward(model, tokens, labels, orders, sizes, generator=None):
            if id(model) not in hooked:
                hooked.add(id(model))
                model.class_emb.weight.register_hook(
                    lambda g: self.class_rows.append(g.abs().sum(1) > 0)
                )
            self.batches.append(
                (
                    tokens.detach().clone(),
                    labels.detach().clone(),
                    orders.detach().clone(),
                    list(sizes),
                )
            )
            return real(model, tokens, labels, orders, sizes, generator=generator)

        monkeypatch.setattr(LPD, "forward", forward)


def released_lr(
    epoch: float,
    base: float,
    epochs: float,
    warmup: float,
    schedule: str,
    min_lr: float,
    start: float,
) -> float:
    """The released per-iteration rule (fractional ``epoch``): linear warm-up, then constant, cosine
    from the end of warm-up, or constant until ``start`` and cosine from there
    (``constant+cosine``)."""
    if epoch < warmup:
        return base * epoch / warmup
    begin = warmup if schedule == "cosine" else start
    if schedule == "constant" or epoch < begin:
        return base
    return min_lr + (base - min_lr) * 0.5 * (
        1.0 + math.cos(math.pi * (epoch - begin) / (epochs - begin))
    )


def test_mirrors_orders_label_dropout_and_lr_follow_the_released_recipe(tmp_path, monkeypatch):
    n, batch, epochs = 2000, 500, 10  # 40 steps, 20,000 samples; labels are sample indices
    rec = Recorder(monkeypatch)
    cfg = config(
        tmp_path,
        epochs=epochs,
        batch_size=batch,
        blr=1e-3,
        warmup_epochs=2.5,
        lr_schedule="constant+cosine",
        lr_decay_start_epoch=6.0,
        min_lr=1e-5,
        weight_decay=0.02,
    )
    train(cfg, dataset=Marked(n, 16), log=lambda m: None)
    assert len(rec.batches) == len(rec.class_rows) == 40
    tokens = torch.cat([t for t, *_ in rec.batches])
    labels = torch.cat([lab for _, lab, *_ in rec.batches])
    orders = torch.cat([o for *_, o, _ in rec.batches])
    total = len(tokens)
    # every sample of an epoch once, with its label, as is or mirrored; a whole sample, never a mix
    assert torch.equal(tokens // 2, (labels % 4)[:, None].expand_as(tokens))
    for e in range(epochs):
        assert sorted(labels[e * n : (e + 1) * n].tolist()) == list(range(n))
    mirrored = int((tokens[:, 0] % 2).sum())
    lo, hi = binom.interval(1 - ALPHA, total, 0.5)
    assert lo <= mirrored <= hi, (
        f"{mirrored} of {total} mirrored; p = 0.5 allows [{lo:.0f}, {hi:.0f}]"
    )
    # one uniformly random order per sample: permutations, not shared within a batch, every position
    # at every rank alike (mean rank (N - 1) / 2 within a Hoeffding bound, union over the 16
    # positions)
    assert torch.equal(orders.sort(1).values, torch.arange(16).expand_as(orders))
    assert all(len({tuple(r) for r in o.tolist()}) > batch // 2 for *_, o, _ in rec.batches)
    mean_rank = orders.argsort(1).double().mean(0)
    bound = 15 * math.sqrt(math.log(2 * 16 / ALPHA) / (2 * total))
    assert (mean_rank - 7.5).abs().max() < bound, mean_rank
    # label dropout 0.1 (the model default the recipe keeps): a dropped label's class row gets no
    # gradient
    dropped = sum(
        int(len(lab) - rows[lab].sum()) for (_, lab, *_), rows in zip(rec.batches, rec.class_rows)
    )
    lo, hi = binom.interval(1 - ALPHA, total, 0.1)
    assert lo <= dropped <= hi, (
        f"{dropped} of {total} labels dropped; p = 0.1 allows [{lo:.0f}, {hi:.0f}]"
    )
    # lr = blr x global batch / 256, set every iteration at epoch + step / steps_per_epoch
    logged = [json.loads(line) for line in (tmp_path / "out" / "log.txt").read_text().splitlines()]
    assert [r["global_step"] for r in logged] == list(range(1, 41))
    base = 1e-3 * batch / 256
    want = [released_lr(k / 4, base, epochs, 2.5, "constant+cosine", 1e-5, 6.0) for k in range(40)]
    assert [r["lr"] for r in logged] == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert (
        want[0] == 0 and want[10] == base and want[-1] < base / 10
    )  # warm-up, plateau and decay all seen


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_the_other_lr_schedules(tmp_path, schedule):
    cfg = config(
        tmp_path,
        epochs=6,
        batch_size=2,
        blr=0.5,
        warmup_epochs=1.5,
        lr_schedule=schedule,
        min_lr=1e-4,
        lr_decay_start_epoch=4.0,
    )
    train(cfg, dataset=Marked(4, 16), log=lambda m: None)
    logged = [
        json.loads(line)["lr"] for line in (tmp_path / "out" / "log.txt").read_text().splitlines()
    ]
    base = 0.5 * 2 / 256
    assert logged == pytest.approx(
        [released_lr(k / 2, base, 6, 1.5, schedule, 1e-4, 4.0) for k in range(12)], rel=1e-12
    )


def test_group_sizes_are_drawn_from_every_released_table_of_the_resolution(tmp_path, monkeypatch):
    rec = Recorder(monkeypatch)
    cfg = config(
        tmp_path,
        img_size=256,
        epochs=1,
        batch_size=1,
        group_sizes_list=None,
        model_config=dict(embed_dim=16, depth=1, num_heads=2, vocab_size=8, class_num=2),
    )
    data = torch.utils.data.TensorDataset(
        torch.zeros(200, 2, 256, dtype=torch.long), torch.zeros(200, dtype=torch.long)
    )
    train(cfg, dataset=data, log=lambda m: None)
    drawn = [tuple(s) for *_, s in rec.batches]
    # 200 draws miss one of 9 equally likely tables with probability 9 (8/9)^200 < 1e-9
    assert sorted({len(s) for s in drawn}) == [8, 12, 16, 20, 24, 32, 64, 128, 256]
    assert len(set(drawn)) == 9 and all(sum(s) == 256 for s in drawn)
    assert tuple(group_sizes(256, 20)) in drawn
    assert (
        1,
        2,
        4,
        5,
        7,
        8,
        10,
        11,
        12,
        14,
        15,
        16,
        17,
        18,
        18,
        19,
        19,
        20,
        20,
        20,
    ) in drawn  # the released 20-step table
    assert max(drawn.count(s) for s in set(drawn)) < 200 * (
        1 / 9 + math.sqrt(math.log(2 * 9 / ALPHA) / 400)
    )


@pytest.mark.parametrize("clip", [1e-3, 1e6])
def test_adamw_betas_decay_on_matrices_only_lr_scaling_and_clipping(tmp_path, clip):
    """One step of 8 samples, read back from the checkpoint: moments ``(1 - 0.9) g`` and ``(1 -
    0.95) g^2`` of the gradient clipped to ``clip`` (its norm is logged before clipping), and every
    weight moved as AdamW's first step with lr = blr x 8 / 256 and decoupled weight decay on the >=
    2-D tensors other than biases."""
    blr, wd = 0.64, 1.0
    cfg = config(tmp_path, epochs=1, batch_size=8, blr=blr, weight_decay=wd, grad_clip=clip)
    train(cfg, dataset=Marked(8, 16), log=lambda m: None)
    lr = blr * 8 / 256
    ck = torch.load(tmp_path / "out" / "checkpoint-last.pth", weights_only=True)
    grad_norm = json.loads((tmp_path / "out" / "log.txt").read_text().splitlines()[0])["grad_norm"]
    used = min(grad_norm, clip)
    assert (
        clip < grad_norm if clip < 1 else clip > grad_norm
    )  # both sides of the threshold are exercised
    groups = ck["optimizer"]["param_groups"]
    assert all(
        tuple(g["betas"]) == (0.9, 0.95) and g["lr"] == pytest.approx(lr, rel=1e-12) for g in groups
    )
    state = ck["optimizer"]["state"]
    m = torch.cat([state[i]["exp_avg"].flatten() for g in groups for i in g["params"]]).double()
    v = torch.cat([state[i]["exp_avg_sq"].flatten() for g in groups for i in g["params"]]).double()
    assert m.norm().item() == pytest.approx(0.1 * used, rel=1e-4)
    assert v.sum().item() == pytest.approx(0.05 * used**2, rel=1e-4)
    # the released rule: no decay for biases and 1-D tensors (norms); in named_parameters order per
    # group
    initial = build_model(cfg)
    names = [n for n, _ in initial.named_parameters()]
    matrix = {n: p.ndim >= 2 and not n.endswith(".bias") for n, p in initial.named_parameters()}
    by_decay = {wd: [n for n in names if matrix[n]], 0.0: [n for n in names if not matrix[n]]}
    assert sorted(g["weight_decay"] for g in groups) == [0.0, wd]
    for g in groups:
        members = by_decay[g["weight_decay"]]
        assert len(members) == len(g["params"])
        for name, i in zip(members, g["params"]):
            p0, p1 = initial.state_dict()[name].double(), ck["model"][name].double()
            s = state[i]
            step = (s["exp_avg"].double() / 0.1) / ((s["exp_avg_sq"].double() / 0.05).sqrt() + 1e-8)
            want = p0 * (1 - lr * g["weight_decay"]) - lr * step
            assert (p1 - want).abs().max().item() < 1e-6, name
    assert (
        len(by_decay[wd]) == 5 + 4 + 1 and len(by_decay[0.0]) == 4 + 8
    )  # embeddings, 4 block matrices, head


def test_released_configs_keep_the_model_default_label_dropout_of_0_1():
    import main_train
    from lpd.models import LPDConfig

    assert (
        LPDConfig().label_drop_prob == 0.1 and TrainConfig().label_drop_prob is None
    )  # None: the model's
    for name in ("l_256", "xl_256", "xxl_256", "l_512", "xl_512"):
        c = main_train.parse_config(
            ["--config", os.path.join(ROOT, "configs", f"train_lpd_{name}.yaml")]
        )
        assert (
            c.label_drop_prob in (None, 0.1)
            and (c.model_config or {}).get("label_drop_prob", 0.1) == 0.1
        )


def _released_cache(root, n: int = 8, num_tokens: int = 256) -> str:
    rng = np.random.default_rng(0)
    for c in ("n01", "n02"):
        os.makedirs(root / c)
        for i in range(n // 2):
            np.savez(
                root / c / f"{c}_{i}.JPEG.npz",
                indices=rng.integers(0, 16384, num_tokens),
                indices_flip=rng.integers(0, 16384, num_tokens),
            )
    return str(root)


@pytest.mark.parametrize("sig, workers", [(signal.SIGTERM, "2"), (signal.SIGUSR1, "0")])
def test_a_preemption_signal_saves_and_exits_75(tmp_path, sig, workers):
    """``python main_train.py``: the signal arrives once a checkpoint exists, mid-run (the run is
    far too long to end first); the process saves ``checkpoint-last.pth`` at the next step boundary
    and exits with 75."""
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "main_train.py"),
        "--config",
        os.path.join(ROOT, "configs", "tiny.yaml"),
        "--use_cached",
        "--cached_path",
        _released_cache(tmp_path / "cache"),
        "--epochs",
        "100000",
        "--batch_size",
        "4",
        "--save_every_steps",
        "1",
        "--num_workers",
        workers,
        "--output_dir",
        str(out),
        "--device",
        "cpu",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while not (out / "checkpoint-last.pth").exists():
                assert proc.poll() is None, (tmp_path / "log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint within 300 s"
                time.sleep(0.05)
            proc.send_signal(sig)
            rc = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = (tmp_path / "log").read_text()
    assert rc == 75, text[-3000:]
    assert f"received {sig.name}" in text and "preempted: saved" in text
    ck = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert 1 <= ck["global_step"] < 100000 * 2


def test_bf16_training_computes_under_bf16_autocast(tmp_path):
    from test_claims_sampling import ComputeDtypes

    with ComputeDtypes() as seen:
        train(
            config(tmp_path, epochs=1, batch_size=4, lr=1e-3, bf16=True),
            dataset=Marked(4, 16),
            log=lambda m: None,
        )
    assert seen.dtypes("addmm") == {torch.bfloat16} and torch.bfloat16 in seen.dtypes("dot_product")
    with ComputeDtypes() as seen:
        train(
            config(tmp_path / "fp32", epochs=1, batch_size=4, lr=1e-3),
            dataset=Marked(4, 16),
            log=lambda m: None,
        )
    assert seen.dtypes() == {torch.float32}


def test_evaluation_during_training_logs_fid_and_is_against_eval_ref_stats(tmp_path, monkeypatch):
    """``--eval_ref_stats``: the FID and IS of the images sampled at cfg 1 and at ``--cfg`` go to
    log.txt; they are those of the evaluation folders' images against the statistics."""
    from lpd import metrics as M
    from lpd.sampling import SamplingConfig

    def extractor(
        weights=None, device="cpu", **kw
    ):  # a fixed small network in place of Inception-v3
        w = torch.linspace(-1, 1, 12 * 5).reshape(12, 5)

        def features_and_logits(images):
            f = torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 2).flatten(1)
            return f, 4 * f @ w

        return features_and_logits

    monkeypatch.setattr(M, "inception_extractor", extractor)
    rng = np.random.default_rng(0)
    M.save_statistics(tmp_path / "ref.npz", rng.random(12), np.eye(12) * 0.1)
    vq = dict(
        ch=32,
        ch_mult=[1, 1, 1, 1, 1],
        z_channels=8,
        codebook_size=8,
        codebook_embed_dim=8,
        num_res_blocks=1,
    )
    cfg = config(
        tmp_path,
        epochs=1,
        batch_size=4,
        lr=1e-3,
        eval_freq=1,
        eval_num_images=10,
        eval_bsz=10,
        vq_config=vq,
        eval_group_sizes="[1, 3, 5, 7]",
        sampling=SamplingConfig(cfg=3.0),
        eval_ref_stats=str(tmp_path / "ref.npz"),
        model_config=dict(embed_dim=16, depth=1, num_heads=2, vocab_size=8, class_num=10),
    )
    train(cfg, dataset=Marked(4, 16), log=lambda m: None)
    logged = [json.loads(line) for line in (tmp_path / "out" / "log.txt").read_text().splitlines()]
    (evaluation,) = [r for r in logged if "eval_cfg1_fid" in r]
    ref = M.load_statistics(tmp_path / "ref.npz")
    for scale in ("1", "3"):
        run = tmp_path / "out" / f"eval-epoch0-cfg{scale}"
        want = M.compute_metrics(str(run / f"{run.name}.npz"), ref, extractor(), progress=False)
        assert evaluation[f"eval_cfg{scale}_fid"] == pytest.approx(want["fid"], rel=1e-9)
        assert evaluation[f"eval_cfg{scale}_inception_score"] == pytest.approx(
            want["inception_score"], rel=1e-9
        )
    assert evaluation["eval_cfg1_fid"] != evaluation["eval_cfg3_fid"]


def test_logs_go_to_log_txt_tensorboard_and_wandb(tmp_path, monkeypatch):
    """With TensorBoard and wandb installed (stand-ins recording their calls) every logged step
    reaches both; without TensorBoard the run says how to get it and goes on."""
    import types

    calls: list[tuple] = []

    class SummaryWriter:
        def __init__(self, log_dir):
            calls.append(("tb", log_dir))

        def add_scalar(self, tag, value, step):
            calls.append(("scalar", tag, step))

        def close(self):
            calls.append(("tb-close",))

    wandb = types.SimpleNamespace(
        init=lambda **k: calls.append(("wandb", k["project"], k["name"])) or wandb,
        log=lambda values, step: calls.append(("wandb-log", step, "loss" in values)),
        finish=lambda: calls.append(("wandb-finish",)),
    )
    monkeypatch.setitem(
        sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter)
    )
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    train(
        config(tmp_path, epochs=1, batch_size=2, lr=1e-3, wandb=True, run_name="r"),
        dataset=Marked(4, 16),
        log=lambda m: None,
    )
    assert calls[:2] == [("tb", str(tmp_path / "out")), ("wandb", "lpd", "r")]
    assert [c for c in calls if c[:2] == ("scalar", "train/loss")] == [
        ("scalar", "train/loss", 1),
        ("scalar", "train/loss", 2),
    ]
    assert [c for c in calls if c[0] == "wandb-log"] == [
        ("wandb-log", 1, True),
        ("wandb-log", 2, True),
    ]
    assert (
        calls[-2:] == [("tb-close",), ("wandb-finish",)]
        and len((tmp_path / "out" / "log.txt").read_text().splitlines()) == 2
    )
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not installed
    said: list[str] = []
    train(
        config(tmp_path / "b", epochs=1, batch_size=2, lr=1e-3, wandb=True),
        dataset=Marked(4, 16),
        log=said.append,
    )
    assert any("pip install tensorboard" in m for m in said)
    assert ("wandb", "lpd", None) in calls  # no --run_name: wandb names the run


def test_an_fsdp_checkpoint_resumes_on_another_world_size(tmp_path):
    """A sharded checkpoint of one process continues under torchrun with two (resharded), to the end
    of the run."""
    cache = _released_cache(tmp_path / "cache", n=8, num_tokens=16)
    flags = [
        "--model",
        "lpd_tiny",
        "--img_size",
        "64",
        "--model_config",
        "{embed_dim: 64, depth: 2, num_heads: 4}",
        "--group_sizes_list",
        "[1, 3, 5, 7]",
        "--use_cached",
        "--cached_path",
        cache,
        "--batch_size",
        "2",
        "--num_workers",
        "0",
        "--fsdp",
        "--lr",
        "1e-3",
        "--warmup_epochs",
        "0",
        "--save_every_steps",
        "0",
        "--seed",
        "0",
        "--device",
        "cpu",
        "--output_dir",
        str(tmp_path / "out"),
    ]
    import torch.distributed as dist

    import main_train

    try:
        first = train(main_train.parse_config(flags + ["--epochs", "1"]), log=lambda m: None)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    from lpd.files import load_checkpoint

    assert first.global_step == 4
    before = load_checkpoint(tmp_path / "out" / "checkpoint-last")["model"]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    proc = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node=2",
            os.path.join(ROOT, "main_train.py"),
            *flags,
            "--epochs",
            "2",
            "--resume",
            str(tmp_path / "out"),
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"resumed from {tmp_path / 'out' / 'checkpoint-last'}" in proc.stdout
    last = load_checkpoint(tmp_path / "out" / "checkpoint-last")
    assert (last["epoch"], last["global_step"]) == (1, 4 + 2)  # epoch 1 on 2 processes x 2: 2 steps
    assert set(last["model"]) == set(before) and any(
        not torch.equal(last["model"][k], v) for k, v in before.items()
    )
    # two AdamW steps of lr 1e-3 away from the loaded weights (a fresh start would be ~0.1 away)
    assert max(float((last["model"][k] - v).abs().max()) for k, v in before.items()) < 1e-2
