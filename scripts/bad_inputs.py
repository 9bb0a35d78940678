"""Run every entry point with bad inputs, as a new user would, and print a Markdown table of what each prints.

    python scripts/bad_inputs.py > bad_inputs.md     (offline: HF_HUB_OFFLINE=1 is set for every run)
"""
import os
import subprocess
import sys
import tempfile

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
    ],
    "main_cache.py": [
        (["--config", "configs/tiny.yaml", "--data_path", f"{T}/imgs", "--cached_path", f"{T}/c", "--img_size", "0"], "img_size 0"),
        (["--config", "configs/tiny.yaml", "--data_path", f"{T}/imgs", "--cached_path", f"{T}/c", "--shard_size", "-5"], "shard_size -5"),
        (["--config", "configs/tiny.yaml", "--data_path", f"{T}/imgs", "--cached_path", f"{T}/c", "--batch_size", "0"], "batch_size 0"),
        (["--config", "configs/tiny.yaml", "--data_path", f"{T}/imgs", "--cached_path", f"{T}/c"], "undecodable image"),
        (["--config", "configs/tiny.yaml", "--data_path", f"{T}/none", "--cached_path", f"{T}/c"], "missing ImageFolder"),
        (["--tokenizer", "palette", "--captions", "auto", "--data_path", f"{T}/none.jsonl", "--cached_path", f"{T}/c"], "missing caption data"),
        (["--tokenizer", "palette", "--captions", "wds", "--data_path", f"{T}/imgs", "--cached_path", f"{T}/c"], "no tar shards"),
        (["--tokenizer", "palette", "--captions", "auto", "--data_path", f"{T}/imgs", "--cached_path", f"{T}/c", "--text_encoder", f"{T}/nope"], "missing text encoder"),
        (["--tokenizer", "palette", "--captions", "auto", "--data_path", f"{T}/imgs", "--cached_path", f"{T}/c", "--max_text_tokens", "1"], "max_text_tokens 1"),
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
print("| entry point | bad input | exit | what it prints (first line of stderr) |")
print("| --- | --- | ---: | --- |")
for entry, cases in CASES.items():
    for argv, what in cases:
        cmd = [PY, *entry.split()] + argv if entry.startswith("-m") else [PY, entry] + argv
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        lines = [l for l in p.stderr.strip().splitlines() if l.strip()]
        tb = any("Traceback" in l for l in lines)
        msg = next((l for l in lines if l.startswith("error") or ": error:" in l), lines[-1] if lines else "(nothing)")
        msg = msg.replace("|", "\\|")[:230]
        print(f"| `{entry}` | {what} | {p.returncode} | {'TRACEBACK: ' if tb else ''}{msg} |")
