"""Run every entry point with bad inputs, as a new user would, and print a Markdown table of what each prints.

    python scripts/bad_inputs.py > bad_inputs.md     (offline: HF_HUB_OFFLINE=1 is set for every run)
"""
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
PY = sys.executable
T = tempfile.mkdtemp()
open(f"{T}/bad.yaml", "w").write("model: lpd_tiny\nbf16: 'false'\n")
open(f"{T}/typo.yaml", "w").write("modle: lpd_tiny\n")
open(f"{T}/notyaml.yaml", "w").write("a: [1, 2\n")
open(f"{T}/bad.png", "wb").write(b"not a png")
open(f"{T}/orders.json", "w").write("[[0, 0]]")
os.makedirs(f"{T}/imgs/a", exist_ok=True)
open(f"{T}/imgs/a/x.png", "wb").write(b"\x89PNG broken")
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
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(f"{T}/photos/{c}/{i}.png")
open(f"{T}/photos/b/2.png", "r+b").truncate(60)
os.makedirs(f"{T}/labels", exist_ok=True)  # a consolidated cache whose labels hold -1
json.dump({"format": "consolidated", "tokenizer": "x", "img_size": 256, "crop": "adm_center_crop", "num_tokens": 256,
           "vocab_size": 16384, "num_images": 4, "classes": ["a", "b"], "images": "sha256:0", "state": "complete",
           "num_shards": 1, "shard_size": 4, "dtype": "int16"}, open(f"{T}/labels/meta.json", "w"))
np.save(f"{T}/labels/shard-00000.tokens.npy", np.zeros((4, 2, 256), np.int16))
np.save(f"{T}/labels/shard-00000.labels.npy", np.array([0, 1, -1, 1]))
np.save(f"{T}/labels/shard-00000.index.npy", np.arange(4))
TRAIN = ["--config", "configs/tiny.yaml", "--batch_size", "2", "--epochs", "2", "--device", "cpu"]


def cache(name: str, out: str) -> list[str]:
    return TRAIN + ["--use_cached", "--cached_path", f"{T}/{name}", "--output_dir", f"{T}/{out}"]


def file_size_limit() -> None:  # a full disk, as far as the checkpoint is concerned: writes past 1 MB fail
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))


TINY = ["--config", "configs/tiny.yaml", "--random_init", "--num_images", "2", "--eval_bsz", "2", "--no_fid",
        "--no_progress", "--output_dir", f"{T}/eval"]
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
        (["--pretrained_ckpt", f"{T}/bad.png", "--no_fid", "--model", "lpd_l"], "checkpoint that is not one"),
        ([a for a in TINY[:-2] if a != "--no_fid"] + ["--fid_stats", f"{T}/nope.npz", "--output_dir", f"{T}/e2"], "missing FID stats (with FID)"),
        (["--model", "lpd_l", "--no_fid", "--output_dir", f"{T}/e3"], "released checkpoint offline"),
    ],
    "main_train.py": [
        (["--config", f"{T}/bad.yaml", "--data_path", T], "YAML bf16: 'false'"),
        (["--model", "lpd_huge", "--data_path", T], "unknown preset"),
        (["--batch_size", "0", "--data_path", T], "batch_size 0"),
        (["--seed", "-1", "--data_path", T], "negative seed"),
        (["--use_cached", "--cached_path", f"{T}/nocache", "--config", "configs/tiny.yaml", "--output_dir", f"{T}/t"], "missing cache"),
        (["--data_path", f"{T}/nope"], "missing ImageFolder"),
        (["--evaluate"], "--evaluate (released flag)"),
        (["--group_size", "[1]*256"], "abbreviated flag"),
        (cache("npz", "t1"), "truncated cache .npz (4 DataLoader workers)"),
        (cache("token", "t2"), "token id >= vocabulary (4 workers)"),
        (TRAIN + ["--data_path", f"{T}/photos", "--output_dir", f"{T}/t3"], "truncated image (4 workers)"),
        (cache("good", "live"), "a second training into a live --output_dir"),
        (cache("good", "t4") + ["--save_every_steps", "1"], "full disk while saving (a 1 MB file size limit)",
         {"preexec_fn": file_size_limit}),
        (cache("good", "t5") + ["--model_config", "{dpth: 2}"], "unknown model_config key"),
        (cache("labels", "t6"), "negative label in the cache"),
        (cache("good", "t7") + ["--device", "cuda:7"], "--device cuda:7 (no such GPU)"),
    ],
    "torchrun --nproc_per_node 2 main_train.py": [
        (cache("npz", "t9"), "truncated cache .npz on one of two processes"),
    ],
    "-m lpd.checkpoint": [
        (["consolidate", T, f"{T}/c.pth"], "consolidate a folder that is not a run"),
    ],
    "main_cache.py": [
        (["--config", "configs/tiny.yaml", "--data_path", f"{T}/imgs", "--cached_path", f"{T}/c", "--img_size", "0"], "img_size 0"),
        (["--config", "configs/tiny.yaml", "--data_path", f"{T}/imgs", "--cached_path", f"{T}/c", "--shard_size", "-5"], "shard_size -5"),
        (["--config", "configs/tiny.yaml", "--data_path", f"{T}/imgs", "--cached_path", f"{T}/c", "--batch_size", "0"], "batch_size 0"),
        (["--config", "configs/tiny.yaml", "--data_path", f"{T}/imgs", "--cached_path", f"{T}/c"], "undecodable image"),
        (["--config", "configs/tiny.yaml", "--data_path", f"{T}/none", "--cached_path", f"{T}/c"], "missing ImageFolder"),
    ],
    "-m lpd.metrics": [
        (["stats", "--input", f"{T}/imgs/a", "--output", T], "--output is a folder"),
        (["fid", "--input", f"{T}/nope.npz", "--stats", f"{T}/nope.npz"], "missing input"),
        (["fid", "--input", f"{T}/imgs/a", "--stats", f"{T}/bad.png", "--json", T], "--json is a folder"),
    ],
    "-m lpd.orders": [
        (["--num", "5", "--output_file", T], "--output_file is a folder"),
        (["--visualize", "--output_file", f"{T}/o.json"], "--visualize into .json"),
        (["--generation_steps", "999", "--output_file", f"{T}/o.json"], "more steps than tokens"),
    ],
    "-m lpd.edit": [
        (["--model", "lpd_l", "--image", f"{T}/bad.png", "--region", "center", "--output", f"{T}/e.png"], "released model offline"),
        (["--config", "configs/tiny.yaml", "--pretrained_ckpt", f"{T}/nope.pth", "--image", f"{T}/bad.png", "--region", "x"], "missing checkpoint"),
        (["--model", "lpd_l", "--image", "x.png", "--region", "center", "--steps", "0"], "steps 0"),
        (["--model", "lpd_l", "--image", "x.png", "--region", "center", "--output", T], "--output is a folder"),
    ],
    "-m lpd.pipeline": [
        (["--model", "lpd_l", "--labels", "1.5"], "non-integer labels"),
        (["--model", "lpd_xl", "--img_size", "512", "--output", f"{T}/s.png"], "released model offline"),
    ],
}
env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=f"{T}/hf", LPD_CACHE=f"{T}/lpdcache", PYTHONPATH=ROOT)
# The training that keeps f"{T}/live" in use while the second one is tried.
live = subprocess.Popen([PY, "main_train.py", *cache("good", "live"), "--epochs", "100000", "--save_last_freq",
                         "100000", "--save_every_epochs", "0"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
while not os.path.exists(f"{T}/live/config.yaml") and live.poll() is None:
    time.sleep(0.1)
print("| entry point | bad input | exit | what it prints (first line of stderr) |")
print("| --- | --- | ---: | --- |")
try:
    for entry, cases in CASES.items():
        for argv, what, *opts in cases:
            opts = opts[0] if opts else {}
            if entry.startswith("torchrun"):
                cmd = [os.path.join(os.path.dirname(PY), "torchrun"), "--standalone", "--nproc_per_node=2",
                       entry.split()[-1]]
            else:
                cmd = [PY, *entry.split()] if entry.startswith("-m") else [PY, entry]
            p = subprocess.run(cmd + argv, cwd=ROOT, env={**env, **opts.get("env", {})}, capture_output=True,
                               text=True, timeout=600, preexec_fn=opts.get("preexec_fn"))
            lines = [l for l in p.stderr.strip().splitlines() if l.strip()]
            # torchrun's summary is a traceback of torchrun; a process of the run would print "[rankN]: Traceback"
            tb = any(("]: Traceback" if entry.startswith("torchrun") else "Traceback") in l for l in lines)
            msg = next((l for l in lines if l.startswith("error") or ": error:" in l),
                       lines[-1] if lines else "(nothing)")
            msg = msg.replace("|", "\\|")[:230]
            print(f"| `{entry}` | {what} | {p.returncode} | {'TRACEBACK: ' if tb else ''}{msg} |")
finally:
    live.kill()
    live.wait()
