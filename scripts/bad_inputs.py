"""Run every entry point with bad inputs, as a new user would, and print a Markdown table of what each prints.

    python scripts/bad_inputs.py > bad_inputs.md     (offline: HF_HUB_OFFLINE=1 is set for every run)
    python scripts/bad_inputs.py lpd.edit stride      (only the rows whose entry point or input names a word)

A case is ``(argv, what)`` or ``(argv, what, files)``: the files (the user's data) must come out unchanged;
the last column says whether they did.
"""

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PY = sys.executable
T = tempfile.mkdtemp()
open(f"{T}/bad.yaml", "w").write("model: lpd_tiny\nbf16: 'false'\n")
open(f"{T}/typo.yaml", "w").write("modle: lpd_tiny\n")
open(f"{T}/notyaml.yaml", "w").write("a: [1, 2\n")
open(f"{T}/bad.png", "wb").write(b"not a png")
open(f"{T}/orders.json", "w").write("[[0, 0]]")
os.makedirs(f"{T}/imgs/a", exist_ok=True)
os.makedirs(f"{T}/noimgs/a", exist_ok=True)
open(f"{T}/imgs/a/x.png", "wb").write(b"\x89PNG broken")
import torch  # noqa: E402 - after the path set-up

from lpd.files import lock_folder  # noqa: E402
from lpd.models import LPD, LPDConfig  # noqa: E402

rng = np.random.default_rng(0)
for rel in (
    "photo.png",
    "u_0.png",
    "imgs2/a/x.png",
    "imgs2/b/y.png",
    "imgs3/a/2019/img.png",
    "imgs3/a/2020/img.png",
):
    os.makedirs(os.path.dirname(f"{T}/{rel}"), exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(f"{T}/{rel}")
os.symlink(f"{T}/imgs3/a", f"{T}/imgs3/a/2020/loop")  # a link loop
os.makedirs(f"{T}/imgs3/.ipynb_checkpoints")  # a stray hidden folder
Image.fromarray(np.zeros((32, 32), np.uint8)).save(f"{T}/black.png")
os.makedirs(f"{T}/imgs4/a")
Image.fromarray((np.arange(48 * 40).reshape(40, 48) % 256 * 257).astype(np.uint16)).save(
    f"{T}/imgs4/a/g16.png"
)
Image.new("RGB", (1, 30000)).save(
    f"{T}/imgs4/a/thin.png"
)  # a few hundred bytes; ADM's resize: 5.9 GB
os.makedirs(f"{T}/run")
net = LPD(LPDConfig(img_size=64, embed_dim=32, depth=1, num_heads=2, vocab_size=64, class_num=10))
torch.save(
    {"model": net.state_dict(), "model_config": net.config.to_dict()},
    f"{T}/run/checkpoint-last.pth",
)
open(f"{T}/run/log.txt", "w").write("epoch 4\n")
os.makedirs(f"{T}/sched/group_sizes_training")
open(f"{T}/sched/group_sizes_lookup.json", "w").write("{}")
open(f"{T}/config.json", "w").write('{"lr": 1}')
live = f"{T}/live/live"  # a run folder that another evaluation is writing into
os.makedirs(f"{live}/images")
open(f"{live}/images/.tmp-000007.png-x", "wb").write(b"half a png")
held = lock_folder(live)
cache_env = dict(os.environ, PYTHONPATH=ROOT)
subprocess.run(
    [
        PY,
        "main_cache.py",
        "--config",
        "configs/tiny.yaml",
        "--img_size",
        "32",
        "--data_path",
        f"{T}/imgs2",
        "--cached_path",
        f"{T}/cache2",
        "--num_workers",
        "0",
    ],
    cwd=ROOT,
    env=cache_env,
    capture_output=True,
    check=True,
    timeout=600,
)
os.makedirs(f"{T}/cache2/.ipynb_checkpoints")  # ignored
os.makedirs(f"{T}/cache2/backup")  # not in meta.json: refused
# Training data with one bad file among 8 (the first file is checked on opening; the others in DataLoader workers).
rng = np.random.default_rng(0)
for name in ("good", "npz", "token"):
    for c in ("a", "b"):
        os.makedirs(f"{T}/{name}/{c}", exist_ok=True)
        for i in range(4):
            ids = rng.integers(0, 16384, (2, 256))
            np.savez(f"{T}/{name}/{c}/{i}.npz", indices=ids[0], indices_flip=ids[1])
open(f"{T}/npz/b/2.npz", "r+b").truncate(100)
np.savez(f"{T}/token/b/2.npz", indices=np.full(256, 16384), indices_flip=np.zeros(256, np.int64))
for c in ("a", "b"):
    os.makedirs(f"{T}/photos/{c}", exist_ok=True)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
            f"{T}/photos/{c}/{i}.png"
        )
open(f"{T}/photos/b/2.png", "r+b").truncate(60)
os.makedirs(f"{T}/labels", exist_ok=True)  # a consolidated cache whose labels hold -1
json.dump(
    {
        "format": "consolidated",
        "tokenizer": "x",
        "img_size": 256,
        "crop": "adm_center_crop",
        "num_tokens": 256,
        "vocab_size": 16384,
        "num_images": 4,
        "classes": ["a", "b"],
        "images": "sha256:0",
        "state": "complete",
        "num_shards": 1,
        "shard_size": 4,
        "dtype": "int16",
    },
    open(f"{T}/labels/meta.json", "w"),
)
np.save(f"{T}/labels/shard-00000.tokens.npy", np.zeros((4, 2, 256), np.int16))
np.save(f"{T}/labels/shard-00000.labels.npy", np.array([0, 1, -1, 1]))
np.save(f"{T}/labels/shard-00000.index.npy", np.arange(4))
TRAIN = ["--config", "configs/tiny.yaml", "--batch_size", "2", "--epochs", "2", "--device", "cpu"]


def cache(name: str, out: str) -> list[str]:
    return TRAIN + ["--use_cached", "--cached_path", f"{T}/{name}", "--output_dir", f"{T}/{out}"]


def file_size_limit() -> (
    None
):  # a full disk, as far as the checkpoint is concerned: writes past 1 MB fail
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))


TINY = [
    "--config",
    "configs/tiny.yaml",
    "--random_init",
    "--num_images",
    "2",
    "--eval_bsz",
    "2",
    "--no_fid",
    "--no_progress",
    "--output_dir",
    f"{T}/eval",
]
CASES = {
    "main_eval.py": [
        (TINY + ["--top_p", "1.5"], "top_p out of range"),
        (TINY + ["--cfg", "nan"], "cfg NaN"),
        (TINY + ["--eval_bsz", "0"], "eval_bsz 0"),
        (TINY + ["--img_size", "0"], "img_size 0"),
        (TINY + ["--seed", str(2**64)], "seed beyond 64 bits"),
        (TINY + ["--group_sizes", "[1]*99999999999"], "huge group-size expression"),
        (TINY + ["--group_sizes", "1,2"], "group sizes that do not sum to N"),
        (TINY + ["--run_name", "../x"], "run name outside --output_dir"),
        (TINY + ["--model", "lpd_huge"], "unknown preset"),
        (TINY + ["--model", "lpd_l"], "preset + conflicting model_config"),
        (TINY + ["--lpd_order_file", f"{T}/missing.json"], "missing order file"),
        (TINY + ["--lpd_order_file", f"{T}/orders.json"], "order file not a permutation"),
        (["--config", f"{T}/bad.yaml", "--random_init", "--no_fid"], "YAML bf16: 'false'"),
        (["--config", f"{T}/typo.yaml"], "unknown config key"),
        (["--config", f"{T}/notyaml.yaml"], "invalid YAML"),
        (["--config", f"{T}/nope.yaml"], "missing config file"),
        (["--pretrained_ckpt", f"{T}/nope.pth", "--no_fid"], "missing checkpoint"),
        (
            ["--pretrained_ckpt", f"{T}/bad.png", "--no_fid", "--model", "lpd_l"],
            "checkpoint that is not one",
        ),
        (
            [a for a in TINY[:-2] if a != "--no_fid"]
            + ["--fid_stats", f"{T}/nope.npz", "--output_dir", f"{T}/e2"],
            "missing FID stats (with FID)",
        ),
        (
            ["--model", "lpd_l", "--no_fid", "--output_dir", f"{T}/e3"],
            "released checkpoint offline",
        ),
        (
            ["--model", "lpd_l", "--output_dir", f"{T}/e4"],
            "every file of a paper row offline (named at once)",
        ),
        (
            [
                "--config",
                "configs/tiny.yaml",
                "--random_init",
                "--fid_stats",
                f"{T}/nope.npz",
                "--inception_weights",
                f"{T}/nope.pth",
                "--output_dir",
                f"{T}/e5",
            ],
            "missing FID stats and Inception weights (named at once)",
        ),
        (
            TINY[:-2] + ["--output_dir", f"{T}/live", "--run_name", "live"],
            "run folder another evaluation writes into",
            [f"{live}/images/.tmp-000007.png-x"],
        ),
        (
            TINY
            + [
                "--vq_config",
                "{ch: 32, ch_mult: [1, 2, 2, 4], z_channels: 64, codebook_size: 16384, "
                "codebook_embed_dim: 8}",
            ],
            "VQ of another stride (8: 128 px images in a 256 px run)",
        ),
    ],
    "main_train.py": [
        (["--config", f"{T}/bad.yaml", "--data_path", T], "YAML bf16: 'false'"),
        (["--model", "lpd_huge", "--data_path", T], "unknown preset"),
        (["--batch_size", "0", "--data_path", T], "batch_size 0"),
        (["--seed", "-1", "--data_path", T], "negative seed"),
        (
            [
                "--use_cached",
                "--cached_path",
                f"{T}/nocache",
                "--config",
                "configs/tiny.yaml",
                "--output_dir",
                f"{T}/t",
            ],
            "missing cache",
        ),
        (["--data_path", f"{T}/nope"], "missing ImageFolder"),
        (["--evaluate"], "--evaluate (released flag)"),
        (["--group_size", "[1]*256"], "abbreviated flag"),
        (
            [
                "--use_cached",
                "--cached_path",
                f"{T}/cache2",
                "--config",
                "configs/tiny.yaml",
                "--img_size",
                "32",
                "--group_sizes_list",
                "[1]*4",
                "--output_dir",
                f"{T}/t2",
            ],
            "cache with a class folder meta.json does not list",
        ),
        (cache("npz", "t1"), "truncated cache .npz (4 DataLoader workers)"),
        (cache("token", "t2"), "token id >= vocabulary (4 workers)"),
        (
            TRAIN + ["--data_path", f"{T}/photos", "--output_dir", f"{T}/t3"],
            "truncated image (4 workers)",
        ),
        (cache("good", "live"), "a second training into a live --output_dir"),
        (
            cache("good", "t4") + ["--save_every_steps", "1"],
            "full disk while saving (a 1 MB file size limit)",
            {"preexec_fn": file_size_limit},
        ),
        (cache("good", "t5") + ["--model_config", "{dpth: 2}"], "unknown model_config key"),
        (cache("labels", "t6"), "negative label in the cache"),
        (cache("good", "t7") + ["--device", "cuda:7"], "--device cuda:7 (no such GPU)"),
    ],
    "torchrun --nproc_per_node 2 main_train.py": [
        (cache("npz", "t9"), "truncated cache .npz on one of two processes"),
    ],
    "main_cache.py": [
        (
            [
                "--config",
                "configs/tiny.yaml",
                "--data_path",
                f"{T}/imgs",
                "--cached_path",
                f"{T}/c",
                "--img_size",
                "0",
            ],
            "img_size 0",
        ),
        (
            [
                "--config",
                "configs/tiny.yaml",
                "--data_path",
                f"{T}/imgs",
                "--cached_path",
                f"{T}/c",
                "--shard_size",
                "-5",
            ],
            "shard_size -5",
        ),
        (
            [
                "--config",
                "configs/tiny.yaml",
                "--data_path",
                f"{T}/imgs",
                "--cached_path",
                f"{T}/c",
                "--batch_size",
                "0",
            ],
            "batch_size 0",
        ),
        (
            [
                "--config",
                "configs/tiny.yaml",
                "--data_path",
                f"{T}/imgs",
                "--cached_path",
                f"{T}/c",
            ],
            "undecodable image",
        ),
        (
            [
                "--config",
                "configs/tiny.yaml",
                "--data_path",
                f"{T}/none",
                "--cached_path",
                f"{T}/c",
            ],
            "missing ImageFolder",
        ),
        (
            [
                "--tokenizer",
                "palette",
                "--captions",
                "auto",
                "--data_path",
                f"{T}/none.jsonl",
                "--cached_path",
                f"{T}/c",
            ],
            "missing caption data",
        ),
        (
            [
                "--tokenizer",
                "palette",
                "--captions",
                "wds",
                "--data_path",
                f"{T}/imgs",
                "--cached_path",
                f"{T}/c",
            ],
            "no tar shards",
        ),
        (
            [
                "--tokenizer",
                "palette",
                "--captions",
                "auto",
                "--data_path",
                f"{T}/imgs",
                "--cached_path",
                f"{T}/c",
                "--text_encoder",
                f"{T}/nope",
            ],
            "missing text encoder",
        ),
        (
            [
                "--tokenizer",
                "palette",
                "--captions",
                "auto",
                "--data_path",
                f"{T}/imgs",
                "--cached_path",
                f"{T}/c",
                "--max_text_tokens",
                "1",
            ],
            "max_text_tokens 1",
        ),
        (
            [
                "--config",
                "configs/tiny.yaml",
                "--img_size",
                "32",
                "--data_path",
                f"{T}/imgs3",
                "--cached_path",
                f"{T}/c3",
                "--num_workers",
                "0",
            ],
            "one file name in two sub-folders, a link loop, a hidden folder (2 images)",
        ),
        (
            [
                "--config",
                "configs/tiny.yaml",
                "--img_size",
                "32",
                "--data_path",
                f"{T}/imgs4",
                "--cached_path",
                f"{T}/c4",
                "--num_workers",
                "0",
            ],
            "a 16-bit PNG and a 1x30000 PNG",
        ),
    ],
    "-m lpd.checkpoint": [
        (
            ["export", f"{T}/run/checkpoint-last.pth", f"{T}/run", "--overwrite"],
            "export into the run folder",
            [f"{T}/run/checkpoint-last.pth", f"{T}/run/log.txt"],
        ),
        (
            ["export", f"{T}/run/checkpoint-last.pth", f"{T}/sched", "--overwrite"],
            "export into a folder of other files",
            [f"{T}/sched/group_sizes_lookup.json"],
        ),
        (["consolidate", f"{T}/nope", f"{T}/x.pth"], "not a run folder"),
        (["consolidate", T, f"{T}/c.pth"], "consolidate a folder that is not a run"),
    ],
    "-m lpd.schedules": [
        (["--help"], "--help (made a folder '--help/')"),
        ([], "no command (rewrote the tracked orders/*.json)"),
        (
            ["write", f"{T}/sched"],
            "a file that differs from the tables",
            [f"{T}/sched/group_sizes_lookup.json"],
        ),
        (["show", "--steps", "0"], "0 steps"),
    ],
    "-m lpd.metrics": [
        (["stats", "--input", f"{T}/imgs/a", "--output", T], "--output is a folder"),
        (
            ["stats", "--input", f"{T}/noimgs", "--output", f"{T}/s.npz"],
            "ImageFolder without images",
        ),
        (
            ["stats", "--input", f"{T}/imgs", "--img_size", "0", "--output", f"{T}/s.npz"],
            "img_size 0",
        ),
        (["fid", "--input", f"{T}/nope.npz", "--stats", f"{T}/nope.npz"], "missing input"),
        (
            ["fid", "--input", f"{T}/imgs/a", "--stats", f"{T}/bad.png", "--json", T],
            "--json is a folder",
        ),
        (
            [
                "fid",
                "--input",
                f"{T}/imgs/a",
                "--stats",
                f"{T}/bad.png",
                "--json",
                f"{T}/config.json",
            ],
            "--json over a JSON file of the user's",
            [f"{T}/config.json"],
        ),
        (
            ["stats", "--input", f"{T}/imgs2/a", "--output", f"{T}/imgs2/a/x.png"],
            "--output over an image of the --input folder",
            [f"{T}/imgs2/a/x.png"],
        ),
    ],
    "-m lpd.orders": [
        (["--num", "5", "--output_file", T], "--output_file is a folder"),
        (["--visualize", "--output_file", f"{T}/o.json"], "--visualize into .json"),
        (
            ["--num", "5", "--output_file", f"{T}/config.json"],
            "--output_file over an existing file",
            [f"{T}/config.json"],
        ),
        (
            ["--visualize", "--output_file", f"{T}/photo.png"],
            "--visualize over the user's photo",
            [f"{T}/photo.png"],
        ),
        (["--generation_steps", "999", "--output_file", f"{T}/o.json"], "more steps than tokens"),
    ],
    "-m lpd.edit": [
        (
            [
                "--model",
                "lpd_l",
                "--image",
                f"{T}/photo.png",
                "--region",
                "center",
                "--output",
                f"{T}/e.png",
            ],
            "released model offline",
        ),
        (
            [
                "--config",
                "configs/tiny.yaml",
                "--pretrained_ckpt",
                f"{T}/nope.pth",
                "--image",
                f"{T}/photo.png",
                "--region",
                "x",
            ],
            "missing checkpoint",
        ),
        (
            [
                "--config",
                "configs/tiny.yaml",
                "--pretrained_ckpt",
                f"{T}/nope.pth",
                "--image",
                f"{T}/bad.png",
                "--region",
                "x",
            ],
            "undecodable image",
        ),
        (["--model", "lpd_l", "--image", "x.png", "--region", "center", "--steps", "0"], "steps 0"),
        (
            ["--model", "lpd_l", "--image", "x.png", "--region", "center", "--output", T],
            "--output is a folder",
        ),
        (
            [
                "--model",
                "lpd_l",
                "--pretrained_ckpt",
                f"{T}/bad.png",
                "--tokenizer",
                "palette",
                "--image",
                "x.png",
                "--region",
                "center",
                "--output",
                f"{T}/e.png",
            ],
            "--model with a checkpoint that is not one",
        ),
        (
            [
                "--model",
                "lpd_l",
                "--image",
                f"{T}/photo.png",
                "--region",
                "center",
                "--output",
                f"{T}/photo.png",
            ],
            "--output equal to --image",
            [f"{T}/photo.png"],
        ),
        (
            [
                "--model",
                "lpd_l",
                "--image",
                f"{T}/photo.png",
                "--region",
                "center",
                "--output",
                f"{T}/u.png",
            ],
            "a per-edit file <output>_0.png over the user's photo",
            [f"{T}/u_0.png"],
        ),
        (
            [
                "--model",
                "lpd_l",
                "--image",
                f"{T}/photo.png",
                "--mask",
                f"{T}/black.png",
                "--output",
                f"{T}/m.png",
            ],
            "an all-black mask",
        ),
    ],
    "-m lpd.pipeline": [
        (["--model", "lpd_l", "--labels", "1.5"], "non-integer labels"),
        (
            ["--model", "lpd_xl", "--img_size", "512", "--output", f"{T}/s.png"],
            "released model offline",
        ),
        (["--pretrained_ckpt", f"{T}/nope.pth", "--output", f"{T}/s.png"], "missing checkpoint"),
        (
            ["--pretrained_ckpt", f"{T}/bad.png", "--output", f"{T}/s.png"],
            "checkpoint that is not one",
        ),
    ],
    "-m lpd.download": [
        (["lpd_l", "256"], "offline, empty caches (every file named at once)"),
        (["lpd_xxl", "512"], "a model not released at that size"),
        (["lpd_huge", "256"], "unknown model"),
    ],
}
env = dict(
    os.environ,
    HF_HUB_OFFLINE="1",
    HF_HUB_CACHE=f"{T}/hf",
    LPD_CACHE=f"{T}/lpdcache",
    PYTHONPATH=ROOT,
)


def digests(paths):
    return {
        p: hashlib.sha256(open(p, "rb").read()).hexdigest() if os.path.exists(p) else None
        for p in paths
    }


# The training that keeps f"{T}/live" in use while the second one is tried.
live = subprocess.Popen(
    [PY, "main_train.py", *cache("good", "live"), "--epochs", "100000", "--save_last_freq", "100000",
     "--save_every_epochs", "0"],
    cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
)  # fmt: skip
while not os.path.exists(f"{T}/live/config.yaml") and live.poll() is None:
    time.sleep(0.1)
print(
    "| entry point | bad input | exit | what it prints (first line of stderr; stdout when it succeeds) | data |"
)
print("| --- | --- | ---: | --- | --- |")
only = sys.argv[1:]
try:
    for entry, cases in CASES.items():
        for argv, what, *extra in cases:
            if only and not any(w in entry or w in what for w in only):
                continue
            # a third element: the user's files that must stay unchanged, or run options
            keep = extra[0] if extra and isinstance(extra[0], list) else []
            opts = extra[0] if extra and isinstance(extra[0], dict) else {}
            before = digests(keep)
            if entry.startswith("torchrun"):
                torchrun = os.path.join(os.path.dirname(PY), "torchrun")
                cmd = [torchrun, "--standalone", "--nproc_per_node=2", entry.split()[-1]]
            else:
                cmd = [PY, *entry.split()] if entry.startswith("-m") else [PY, entry]
            p = subprocess.run(
                cmd + argv, cwd=ROOT, env={**env, **opts.get("env", {})}, capture_output=True,
                text=True, timeout=600, preexec_fn=opts.get("preexec_fn"),
            )  # fmt: skip
            lines = [l for l in p.stderr.strip().splitlines() if l.strip()]
            # torchrun's own summary is a traceback of torchrun; a process of the run prints "[rankN]: Traceback"
            mark = "]: Traceback" if entry.startswith("torchrun") else "Traceback"
            tb = any(mark in l for l in lines)
            out = [l for l in p.stdout.strip().splitlines() if l.strip()]
            msg = next(
                (l for l in lines if l.startswith("error") or ": error:" in l),
                lines[-1] if lines else "(nothing)",
            )
            msg = (out[-1] if p.returncode == 0 and out else msg).replace("|", "\\|")[:230]
            lost = [os.path.relpath(k, T) for k, v in digests(keep).items() if v != before[k]]
            data = "" if not keep else f"LOST: {', '.join(lost)}" if lost else "kept"
            tag = "TRACEBACK: " if tb else ""
            print(f"| `{entry}` | {what} | {p.returncode} | {tag}{msg} | {data} |", flush=True)
finally:
    live.kill()
    live.wait()
    os.close(held)
stray = [d for d in os.listdir(ROOT) if d.startswith("-")]
print(f"\nFolders made in the repository root: {stray or 'none'}")
