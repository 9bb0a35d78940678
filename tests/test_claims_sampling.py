"""README claims of sampling and evaluation: bf16 sampling really computes in bf16 (the transformer
and the VQ decoder, unless ``decode_fp32``); a rerun whose tokenizer file changed under the same
name is refused; ``python -m lpd.pipeline`` writes its grid; the README's Python blocks run as
written (with tiny stand-ins for the released files)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from lpd.editing import edit_tokens
from lpd.evaluate import RunSpec, generate_images
from lpd.models import LPD, LPDConfig, build_lpd
from lpd.sampling import SamplingConfig, sample_tokens
from lpd.tokenizer import make_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "configs", "tiny.yaml")) as _f:
    TINY = yaml.safe_load(_f)
SMALL_VQ = dict(
    ch=32,
    ch_mult=[1, 1, 1, 1, 1],
    z_channels=8,
    codebook_size=24,
    codebook_embed_dim=8,
    num_res_blocks=1,
)


class ComputeDtypes(TorchDispatchMode):
    """The floating dtypes of the inputs of every matrix product, attention and convolution that
    runs."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, set[torch.dtype]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if (
            name in ("mm", "addmm", "bmm", "baddbmm", "convolution")
            or "dot_product" in name
            or "linear" in name
        ):
            self.ops.append(
                (
                    name,
                    {
                        a.dtype
                        for a in args
                        if isinstance(a, torch.Tensor) and a.is_floating_point()
                    },
                )
            )
        return func(*args, **(kwargs or {}))

    def dtypes(self, kind: str = "") -> set[torch.dtype]:
        return set().union(*[d for n, d in self.ops if kind in n])


@pytest.fixture(scope="module")
def model():
    net = build_lpd(img_size=64, embed_dim=32, depth=2, num_heads=4, vocab_size=24, class_num=5)
    net.initialize_weights(torch.Generator().manual_seed(0))
    return net.eval()


@pytest.mark.parametrize("bf16", [False, True])
def test_bf16_sampling_computes_in_bf16(model, bf16):
    orders = torch.stack(
        [torch.randperm(16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    )
    with ComputeDtypes() as seen:
        sample_tokens(
            model,
            [1, 2],
            orders,
            [1, 3, 12],
            SamplingConfig(cfg=2.0, bf16=bf16),
            generator=torch.Generator(),
        )
    assert len(seen.ops) >= 3 * 2 * 2 and seen.dtypes() == {
        torch.bfloat16 if bf16 else torch.float32
    }
    keep = np.zeros((2, 16), bool)
    keep[:, :6] = True
    with ComputeDtypes() as seen:
        edit_tokens(
            model,
            torch.zeros(2, 16, dtype=torch.long),
            keep,
            [1, 2],
            steps=3,
            sampling=SamplingConfig(cfg=2.0, bf16=bf16),
        )
    assert len(seen.ops) >= 4 * 2 * 2 and seen.dtypes() == {
        torch.bfloat16 if bf16 else torch.float32
    }


def test_a_bf16_model_decodes_with_bf16_weights_and_caches():
    net = build_lpd(img_size=64, embed_dim=32, depth=2, num_heads=4, vocab_size=24, class_num=5)
    net.initialize_weights(torch.Generator().manual_seed(0))
    net = net.to(torch.bfloat16).eval()
    orders = torch.stack(
        [torch.randperm(16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    )
    with ComputeDtypes() as seen:
        tokens = sample_tokens(
            net,
            [1, 2],
            orders,
            [1, 3, 12],
            generator=torch.Generator().manual_seed(0),
            sampling=SamplingConfig(cfg=2.0),
        )
    assert tokens.shape == (2, 16) and seen.dtypes() == {
        torch.bfloat16
    }  # no autocast: the weights and the KV cache


@pytest.mark.parametrize("decode_fp32", [False, True])
def test_bf16_evaluation_decodes_the_vq_in_bf16_unless_decode_fp32(model, decode_fp32):
    vq = make_tokenizer("vq", None, SMALL_VQ, seed=0)
    sampling = SamplingConfig(cfg=2.0, bf16=True, decode_fp32=decode_fp32)
    with ComputeDtypes() as seen:
        generate_images(model, vq, RunSpec(2, [1, 3, 12], seed=0, eval_bsz=2), sampling)
    assert seen.dtypes("addmm") == {torch.bfloat16}  # the transformer's linear layers
    assert seen.dtypes("convolution") == {torch.float32 if decode_fp32 else torch.bfloat16}
    with ComputeDtypes() as seen:
        generate_images(
            model, vq, RunSpec(2, [1, 3, 12], seed=0, eval_bsz=2), sampling.replace(bf16=False)
        )
    assert seen.dtypes() == {torch.float32}


def test_rank_r_of_w_samples_images_i_mod_w_and_the_vq_decodes_chunks_of_8(model, tmp_path):
    """Rank 1 of 3 writes exactly the images 1, 4, 7 of 9, in batches of at most ``eval_bsz``; every
    decoder call gets 8 token grids whatever the batch, so its rounding cannot depend on
    ``eval_bsz``."""
    from lpd import evaluate as E
    from lpd.tokenizer.palette import PaletteTokenizer

    class Recording(PaletteTokenizer):
        def decode(self, tokens):
            shapes.append(tuple(tokens.shape))
            return super().decode(tokens)

    shapes: list[tuple] = []
    sampling = SamplingConfig(cfg=2.0)
    tok = Recording(levels=24)
    E.prepare_run_dir(
        tmp_path, E.run_settings(model, tok, RunSpec(9, [1, 3, 12]), sampling), model.num_tokens
    )
    out = generate_images(
        model,
        tok,
        RunSpec(9, [1, 3, 12], seed=0, eval_bsz=2),
        sampling,
        output_dir=tmp_path,
        shard=(1, 3),
    )
    assert out.generated == 3 and sorted(os.listdir(tmp_path / "images")) == [
        "000001.png",
        "000004.png",
        "000007.png",
    ]
    assert shapes == [
        (8, 4, 4),
        (8, 4, 4),
    ]  # batches of 2 and 1 images, each padded to a chunk of 8
    shapes.clear()
    generate_images(model, tok, RunSpec(11, [1, 3, 12], seed=0, eval_bsz=11), sampling)
    assert shapes == [(8, 4, 4), (8, 4, 4)]


def test_a_rerun_whose_tokenizer_file_changed_under_the_same_name_is_refused(tmp_path, capsys):
    import main_eval

    vq_path = tmp_path / "vq.pt"

    def write_vq(seed: int) -> None:
        torch.save(
            {"model": make_tokenizer("vq", None, TINY["vq_config"], seed=seed).state_dict()},
            vq_path,
        )

    argv = [
        "--config",
        os.path.join(ROOT, "configs", "tiny.yaml"),
        "--img_size",
        "64",
        "--random_init",
        "--num_images",
        "2",
        "--eval_bsz",
        "2",
        "--generation_steps",
        "8",
        "--cfg",
        "1.0",
        "--no_fid",
        "--no_progress",
        "--vqgan_path",
        str(vq_path),
        "--output_dir",
        str(tmp_path / "out"),
    ]
    write_vq(0)
    assert main_eval.main(argv) == 0
    (run,) = os.listdir(tmp_path / "out")
    images = {
        f: (tmp_path / "out" / run / "images" / f).read_bytes()
        for f in os.listdir(tmp_path / "out" / run / "images")
    }
    assert main_eval.main(argv) == 0  # the same inputs: nothing to do
    write_vq(1)
    capsys.readouterr()
    assert main_eval.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "tokenizer" in err and "Traceback" not in err
    assert {f: (tmp_path / "out" / run / "images" / f).read_bytes() for f in images} == images


def _export(tmp_path) -> str:
    """A small model at 256 px with the palette tokenizer (as the demo's), exported by ``python -m
    lpd.checkpoint export``."""
    from lpd.checkpoint import main as checkpoint_main
    from lpd.files import save_checkpoint
    from lpd.train import TrainConfig

    config = dict(embed_dim=32, depth=2, num_heads=4, vocab_size=4, class_num=1000)
    model = LPD(LPDConfig(img_size=256, **config))
    model.initialize_weights(torch.Generator().manual_seed(0))
    args = TrainConfig(
        model=None,
        img_size=256,
        model_config=config,
        tokenizer="palette",
        vq_config={"levels": 4},
        seed=0,
    )
    save_checkpoint(
        {
            "model": model.state_dict(),
            "model_config": model.config.to_dict(),
            "args": args.to_dict(),
            "epoch": 0,
            "step": 0,
            "global_step": 1,
        },
        tmp_path / "ck.pth",
    )
    assert checkpoint_main(["export", str(tmp_path / "ck.pth"), str(tmp_path / "export")]) == 0
    return str(tmp_path / "export")


def test_python_m_lpd_pipeline_writes_the_grid_of_the_pipeline(tmp_path):
    from lpd.pipeline import LPDPipeline

    folder = _export(tmp_path)
    cmd = [
        sys.executable,
        "-m",
        "lpd.pipeline",
        "--model",
        folder,
        "--labels",
        "207,360",
        "--steps",
        "8",
        "--cfg",
        "4.8",
        "--device",
        "cpu",
        "--output",
        str(tmp_path / "samples.png"),
    ]
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    proc = subprocess.run(
        cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote 2 images" in proc.stdout
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images = LPDPipeline.from_pretrained(folder, device="cpu")([207, 360], steps=8, cfg=4.8)
    finally:
        torch.set_num_threads(n)
    with Image.open(tmp_path / "samples.png") as grid:
        assert grid.size == (512 + 2, 256)  # two tiles and a 2-pixel gutter
        grid = np.asarray(grid.convert("RGB"))
        assert np.array_equal(grid[:, :256], images[0]) and np.array_equal(
            grid[:, -256:], images[1]
        )


def run_readme_block(marker: str, scope: dict | None = None) -> dict:
    """Run the README's Python block holding ``marker`` as a script (from a file in the working
    directory), with ``scope`` predefined; returns its globals."""
    import runpy

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.DOTALL)
    (block,) = [b for b in blocks if marker in b]
    with open("readme_block.py", "w", encoding="utf-8") as f:
        f.write(block)
    return runpy.run_path("readme_block.py", init_globals=scope)


@pytest.fixture()
def tiny_release(monkeypatch, tmp_path):
    """``from_pretrained("lpd_l", 256)``, ``load_lpd("lpd_l_256.pth", model="lpd_l")`` and
    ``load_vq("vq_ds16_c2i.pt")`` give a small model at 256 px and an exact 16-level tokenizer with
    the VQ's interface (decoding in no time); the working directory is a fresh folder with
    ``dog.png``."""
    import lpd.models
    import lpd.tokenizer
    from lpd.pipeline import LPDPipeline
    from lpd.tokenizer.palette import PaletteTokenizer

    net = LPD(
        LPDConfig(img_size=256, embed_dim=32, depth=2, num_heads=4, vocab_size=16, class_num=1000)
    )
    net.initialize_weights(torch.Generator().manual_seed(0))
    vq = PaletteTokenizer(levels=16)
    calls = []

    def from_pretrained(name, img_size=None, **kw):
        calls.append(("from_pretrained", name, img_size))
        return LPDPipeline(net, vq, name=name)

    def load_lpd(path, model=None, **kw):
        calls.append(("load_lpd", path, model))
        return net

    def load_vq(path, **kw):
        calls.append(("load_vq", path))
        return vq

    monkeypatch.setattr(LPDPipeline, "from_pretrained", staticmethod(from_pretrained))
    monkeypatch.setattr(lpd.models, "load_lpd", load_lpd)
    monkeypatch.setattr(lpd.tokenizer, "load_vq", load_vq)
    monkeypatch.chdir(tmp_path)
    Image.fromarray((np.random.RandomState(0).rand(300, 280, 3) * 255).astype(np.uint8)).save(
        tmp_path / "dog.png"
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield net, calls
    torch.set_num_threads(threads)


def test_readme_sampling_blocks_run_as_written(tiny_release):
    _, calls = tiny_release
    scope = run_readme_block("pipe([207, 360, 387, 974]")
    assert scope["images"].dtype == np.uint8 and scope["images"].shape == (4, 256, 256, 3)
    assert os.path.isfile("samples.png")
    images = run_readme_block("load_vq(")["images"]
    assert images.shape == (4, 3, 256, 256) and images.min() >= -1 and images.max() <= 1
    assert calls == [
        ("from_pretrained", "lpd_l", 256),
        ("load_lpd", "lpd_l_256.pth", "lpd_l"),
        ("load_vq", "vq_ds16_c2i.pt"),
    ]


def test_readme_editing_block_runs_as_written(tiny_release):
    net, calls = tiny_release
    keep = np.zeros((2, 256), bool)
    keep[:, :128] = True
    tokens = torch.randint(0, 16, (2, 256), generator=torch.Generator().manual_seed(0))
    given = {"model": net, "tokens": tokens, "keep": keep, "labels": [207, 360]}
    scope = run_readme_block("pipe.inpaint(", {**given, "g": torch.Generator().manual_seed(0)})
    assert calls == [("from_pretrained", "lpd_l", 256)]
    out, edited = scope["out"], scope["tokens"]
    assert out["edits"].shape == (1, 256, 256, 3) and out["source"].shape == (256, 256, 3)
    assert edited.shape == (2, 256) and torch.equal(edited[:, :128], tokens[:, :128])
