"""Training a text model straight from webdataset tar shards: main_train.py streams them (images
tokenized on the fly, one caption per epoch), reports bad samples and resumes mid-epoch exactly;
each process reads its own shards."""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import tarfile

import numpy as np
import pytest
import torch
from conftest import run_process
from PIL import Image

import lpd.text.training
import main_train
from lpd.recipe import EpochBatchSampler
from lpd.text.data import CaptionStream
from lpd.text.encoders import make_text_encoder

IMG = 64  # the palette tokenizer: 4 x 4 tokens of 4 colours
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
ARCH = "{condition: text, text_dim: 256, max_text_tokens: 8, embed_dim: 16, depth: 1, "
ARCH += "num_heads: 2, vocab_size: 4}"


def _image(seed: int, fmt: str = "png") -> bytes:
    grey = np.random.default_rng(seed).integers(0, 4, (4, 4)) * 85
    buf = io.BytesIO()
    Image.fromarray(
        np.kron(grey, np.ones((16, 16)))[..., None].repeat(3, -1).astype(np.uint8)
    ).save(buf, fmt)
    return buf.getvalue()


def write_shards(root, shards):
    """Tar shards of ``{key: (image bytes, ext, caption member ext, caption bytes)}``."""
    root.mkdir(exist_ok=True)
    for s, samples in enumerate(shards):
        with tarfile.open(root / f"part-{s:03d}.tar", "w") as tf:
            for key, (data, ext, cap_ext, cap) in samples.items():
                for name, payload in ((f"{key}.{ext}", data), (f"{key}.{cap_ext}", cap)):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
    return str(root)


def two_shards(root):
    """Two shards of 3 and 2 captioned images (.txt, .json, a list of two captions, a .jpg)."""
    many = json.dumps({"caption": ["a bold seven", "seven, thick"]}).encode()
    return write_shards(
        root,
        [
            {
                "s0": (_image(0), "png", "txt", b"a small 3, top left"),
                "s1": (_image(1), "jpg", "json", many),
                "s2": (_image(2), "png", "txt", b"eight"),
            },
            {
                "s3": (_image(3), "png", "json", json.dumps({"caption": "a 1"}).encode()),
                "s4": (_image(4), "webp", "txt", b"a thin two"),
            },
        ],
    )


def train(tmp_path, data, out, *extra):
    (tmp_path / "t2i.yaml").write_text(f"model: null\nmodel_config: {ARCH}\n")
    flags = ["--config", str(tmp_path / "t2i.yaml"), "--tokenizer", "palette", "--img_size"]
    flags += [str(IMG), "--data_path", data, "--output_dir", str(tmp_path / out), "--seed", "3"]
    flags += ["--batch_size", "1", "--lr", "1e-2", "--warmup_epochs", "0", "--ema_decay", "0.9"]
    flags += ["--group_sizes_list", "[1, 3, 12]", "--device", "cpu", "--save_every_epochs", "0"]
    return main_train.main([*flags, "--save_every_steps", "0", *extra])


def weights(tmp_path, out):
    ckpt = torch.load(tmp_path / out / "checkpoint-last.pth", weights_only=True)
    return ckpt, {k: v for key in ("model", "model_ema") for k, v in ckpt[key].items()}


def test_trains_from_tar_shards_and_resumes_mid_epoch_exactly(tmp_path, monkeypatch, capsys):
    """Two workers (readers) over two shards, 5 steps an epoch (one reader cycles its shard);
    preempted at epoch 1, step 2, the resumed run ends with the uninterrupted run's weights."""
    data = two_shards(tmp_path / "data")
    epochs = ["--epochs", "2", "--num_workers", "2"]
    assert train(tmp_path, data, "whole", *epochs) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "2 tar shard(s): 5 images with captions" in out and "5 steps per epoch" in out
    whole, want = weights(tmp_path, "whole")
    assert whole["model_config"]["text_encoder"] == make_text_encoder("wordllama").record
    make, calls = lpd.text.training.make_text_encoder, []

    def preempting_encoder(*a, **kw):  # the signal arrives during the 8th step (epoch 1, step 2)
        enc = make(*a, **kw)
        encode = enc.encode

        def counted(ids, mask):
            calls.append(1)
            if len(calls) == 8:
                os.kill(os.getpid(), signal.SIGUSR1)
            return encode(ids, mask)

        enc.encode = counted
        return enc

    monkeypatch.setattr(lpd.text.training, "make_text_encoder", preempting_encoder)
    assert train(tmp_path, data, "split", *epochs) == 75
    split, _ = weights(tmp_path, "split")
    assert (split["epoch"], split["step"]) == (1, 3)
    monkeypatch.undo()
    assert train(tmp_path, data, "split", *epochs, "--resume", str(tmp_path / "split")) == 0
    _, got = weights(tmp_path, "split")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def epoch_of(epoch):
    return EpochBatchSampler(5, 5, 5, epoch, 0, 1, 0)


def batches(loader):
    return [torch.cat([img.flatten(1), ids], 1) for img, ids, _ in loader]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_epoch_goes_on_with_the_same_batches(tmp_path, workers):
    data = two_shards(tmp_path / "data")
    stream = CaptionStream(data, IMG, make_text_encoder("wordllama", max_text_tokens=8), seed=5)
    assert len(stream) == 5 and stream.report.truncated == 0
    for epoch in (0, 1):
        full = batches(stream.loader(EpochBatchSampler(5, 2, 5, epoch, 0, 1, 0), workers))
        assert len(full) == 2
        for start in (1, 2):
            sampler = EpochBatchSampler(5, 2, 5, epoch, 0, 1, start)
            assert [
                torch.equal(a, b)
                for a, b in zip(batches(stream.loader(sampler, workers)), full[start:])
            ] == [True] * (2 - start)
    if workers == 0:  # one reader, one pass: every image once, one of its captions per epoch
        rows = [
            {tuple(r.tolist()) for r in torch.cat(batches(stream.loader(epoch_of(e), 0)))}
            for e in range(6)
        ]
        assert all(len(r) == 5 for r in rows) and len(set().union(*rows)) == 6


def test_bad_samples_are_reported_and_training_goes_on(tmp_path, capsys):
    """A shard cut in the middle keeps its complete samples; an undecodable image is skipped with
    a warning; an image without a caption and a long caption are counted."""
    long = b"a very long caption about a seven " * 4
    data = write_shards(
        tmp_path / "data",
        [
            {
                "ok0": (_image(0), "png", "txt", b"a seven"),
                "bad": (b"not an image", "png", "txt", b"a three"),
                "long": (_image(1), "png", "txt", long),
            },
            {"ok1": (_image(2), "png", "txt", b"one"), "cut": (_image(3), "png", "txt", b"two")},
        ],
    )
    shard = os.path.join(data, "part-001.tar")
    with tarfile.open(shard) as tf:
        cut = [m for m in tf.getmembers() if m.name == "cut.png"][0].offset_data + 10
    with open(shard, "rb") as f:
        head = f.read(cut)
    with open(shard, "wb") as f:
        f.write(head)
    assert train(tmp_path, data, "out", "--epochs", "1", "--num_workers", "0") == 0
    out, err = capsys.readouterr()
    assert "4 images with captions" in out and "1 cut shards (" in out and "part-001.tar" in out
    assert "1 truncated" in out
    assert "skipped bad (not a readable image" in err and "Traceback" not in err
    assert weights(tmp_path, "out")[0]["step"] == 4


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: str(p), "training streams webdataset .tar shards"),
        (lambda p: str(p / "x-{000..001}.tar"), "tar shards missing"),
    ],
)
def test_bad_data_paths_are_one_line(tmp_path, capsys, make, match):
    (tmp_path / "a.png").write_bytes(_image(0))
    assert train(tmp_path, make(tmp_path), "out", "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --data_path") and match in err and "Traceback" not in err


@pytest.mark.timeout(600)
def test_each_process_reads_its_own_shards(tmp_path):
    """torchrun, 2 processes over 3 shards: process 0 reads shards 0 and 2, process 1 shard 1;
    both count all 6 images and refuse alike when a process's shards hold none."""
    data = write_shards(
        tmp_path / "data",
        [
            {f"k{s}{i}": (_image(2 * s + i), "png", "txt", b"a 3") for i in range(2)}
            for s in range(3)
        ],
    )
    empty = write_shards(tmp_path / "empty", [{"a": (_image(0), "png", "txt", b"a 3")}, {}])
    script = tmp_path / "streams.py"
    script.write_text(
        "import json, sys, torch.distributed as dist\n"
        "from lpd.text.data import CaptionStream\n"
        "from lpd.text.encoders import make_text_encoder\n"
        "dist.init_process_group('gloo')\n"
        "r, enc = dist.get_rank(), make_text_encoder('wordllama', max_text_tokens=8)\n"
        "s = CaptionStream(sys.argv[1], 64, enc, rank=r, world_size=2)\n"
        "out = [len(s), [x.sum().item() for x, _, _ in s], s.shards]\n"
        "try:\n"
        "    CaptionStream(sys.argv[3], 64, enc, rank=r, world_size=2)\n"
        "except RuntimeError as e:\n"
        "    out.append(str(e))\n"
        "json.dump(out, open(f'{sys.argv[2]}-{r}.json', 'w'))\n"
        "dist.destroy_process_group()\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [
        TORCHRUN,
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        data,
        str(tmp_path / "r"),
        empty,
    ]
    result = run_process(cmd, 300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    got = [json.loads((tmp_path / f"r-{r}.json").read_text()) for r in (0, 1)]
    assert [g[0] for g in got] == [6, 6]
    assert [[os.path.basename(s) for s in g[2]] for g in got] == [
        ["part-000.tar", "part-002.tar"],
        ["part-001.tar"],
    ]
    assert len(got[0][1]) == len(got[1][1]) == 3  # ceil(6 / 2) each
    assert got[0][3] == got[1][3] and "the shards of process 1 of 2 hold no image" in got[0][3]
