"""Text-to-image evaluation: prompt files, CLIPScore on a tiny CLIP saved and loaded by path."""

from __future__ import annotations

import json
import os
import re
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lpd.images import write_png
from lpd.text.clipscore import CLIPScorer, clip_score
from lpd.text.prompts import prompt_of, read_prompts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PROMPTS = ["a red 7", "seven", "a bold 3 to the left of a 5", "x", "a small 2 in the top left"]


def save_tiny_clip(folder, seed=0):
    """A CLIP of two 16-wide layers with a byte-level tokenizer (no merges), saved offline."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor
    from transformers.models.clip.tokenization_clip import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in sorted(ByteLevel.alphabet()):
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    text = dict(vocab_size=len(vocab), max_position_embeddings=16, bos_token_id=0, eos_token_id=1)
    layers = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    vision = dict(image_size=32, patch_size=8, **layers)
    torch.manual_seed(seed)
    model = CLIPModel(
        CLIPConfig(text_config={**text, **layers}, vision_config=vision, projection_dim=8)
    )
    image = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=image, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return str(save_tiny_clip(tmp_path_factory.mktemp("clip")))


def _images(n=5, size=48):
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_clip_score_equals_an_independent_computation(clip_folder, tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    images = _images()
    model, proc = CLIPModel.from_pretrained(clip_folder), CLIPProcessor.from_pretrained(clip_folder)
    inputs = proc(
        text=PROMPTS, images=list(images), padding=True, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        img = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        txt = model.get_text_features(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).pooler_output
    cos = (img / img.norm(dim=-1, keepdim=True) * (txt / txt.norm(dim=-1, keepdim=True))).sum(-1)
    assert (cos < 0).any() and (cos > 0).any()  # the clamp at 0 matters here
    expected = (100 * cos.clamp(min=0)).double()

    scorer = CLIPScorer(clip_folder)
    out = clip_score(scorer, images, PROMPTS, batch_size=2)
    assert out["clip_score_w100"] == pytest.approx(float(expected.mean()), abs=1e-4)
    assert out["clip_score_w100_std"] == pytest.approx(float(expected.std(False)), abs=1e-4)
    assert out["clip_model"] == clip_folder and len(out["clip_sha256"]) == 64
    paths = []
    for i, im in enumerate(images):
        paths.append(str(tmp_path / f"{i}.png"))
        write_png(paths[-1], im)
    by_path = clip_score(scorer, paths, PROMPTS, batch_size=3)
    assert by_path["clip_score_w100"] == pytest.approx(out["clip_score_w100"], abs=1e-5)


def test_clip_score_errors(clip_folder, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="--clip_model .*cannot be loaded"):
        CLIPScorer(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="5 images but 4 prompts"):
        clip_score(CLIPScorer(clip_folder), _images(), PROMPTS[:4])
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip fails
    with pytest.raises(FileNotFoundError, match="pip install open_clip_torch"):
        CLIPScorer("open_clip:ViT-B-32/laion2b_s34b_b79k")


def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a red 7\n\n  seven  \nx\n", encoding="utf-8")
    prompts, digest = read_prompts(txt)
    assert prompts == ["a red 7", "seven", "x"] and len(digest) == 64
    assert [prompt_of(prompts, i) for i in range(5)] == [
        "a red 7",
        "seven",
        "x",
        "a red 7",
        "seven",
    ]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps({"caption": p, "id": i}) for i, p in enumerate(PROMPTS)))
    assert read_prompts(jsonl)[0] == PROMPTS
    assert read_prompts(jsonl)[1] != read_prompts(txt)[1]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"caption": "ok"}\n{"text": "no caption"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: .*\"caption\""):
        read_prompts(bad)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_prompts(tmp_path / "latin.txt")
    with pytest.raises(FileNotFoundError, match="--prompts"):
        read_prompts(tmp_path / "nope.txt")


# ------------------------------------------------------------------------------ main_eval --prompts

TEXT_MODEL = "{vocab_size: 16384, condition: text, text_dim: 256, max_text_tokens: 16}"


def t2i_argv(out, prompts, *more):
    return [
        *("--config", os.path.join(ROOT, "configs", "tiny.yaml"), "--random_init"),
        *("--img_size", "64", "--model_config", TEXT_MODEL, "--text_encoder", "wordllama"),
        *("--prompts", str(prompts), "--num_images", "5", "--eval_bsz", "2"),
        *("--generation_steps", "4", "--cfg", "3.0", "--seed", "1", "--no_progress"),
        *("--output_dir", str(out), *more),
    ]


def run_eval(argv):
    import main_eval

    old = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels for every batch composition
    try:
        return main_eval.run(main_eval.parse_args(argv), argv)
    finally:
        torch.set_num_threads(old)


def pngs(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


@pytest.fixture(scope="module")
def prompt_run(tmp_path_factory, clip_folder):
    from lpd import metrics as M

    tmp = tmp_path_factory.mktemp("t2i_eval")
    (tmp / "coco.txt").write_text("a red 7\nseven in the top left\na bold 3 to the left of a 5\n")
    M.save_statistics(tmp / "ref.npz", np.linspace(0, 1, 12), np.eye(12) * 0.01)
    extra = ("--fid_stats", str(tmp / "ref.npz"), "--clip_model", clip_folder)
    mp = pytest.MonkeyPatch()
    mp.setattr(M, "inception_extractor", lambda *a, **k: _stand_in_extractor)
    mp.setattr(M, "resolve_inception_weights", lambda *a, **k: str(tmp / "unused.pth"))
    try:
        record = run_eval(t2i_argv(tmp / "out", tmp / "coco.txt", *extra))
    finally:
        mp.undo()
    return tmp, record


def _stand_in_extractor(images):
    x = torch.nn.functional.adaptive_avg_pool2d(images.float() / 255.0, 2).flatten(1)
    return x, 3 * x @ torch.linspace(-1, 1, 12 * 5).reshape(12, 5)


@pytest.mark.filterwarnings("ignore:only 5 images")
def test_main_eval_prompts_writes_fid_and_clip_score(prompt_run, clip_folder):
    tmp, record = prompt_run
    run_dir = os.path.dirname(record["files"]["metrics"])
    assert os.path.basename(run_dir).startswith("lpd_tiny-randinit-coco-res64-steps4-cfg3.0")
    images = pngs(tmp / "out" / os.path.basename(run_dir) / "images")
    assert sorted(images) == [f"{i:06d}.png" for i in range(5)]
    texts = ["a red 7", "seven in the top left", "a bold 3 to the left of a 5"]
    with open(os.path.join(run_dir, "settings.json")) as f:
        labels = json.load(f)["labels"]
    assert labels["prompts_file"] == "coco.txt" and labels["num_prompts"] == 3
    assert labels["prompts_sha256"] == read_prompts(tmp / "coco.txt")[1]
    assert labels["text_encoder"]["kind"] == "wordllama"
    paths = [os.path.join(run_dir, "images", n) for n in sorted(images)]
    expected = clip_score(CLIPScorer(clip_folder), paths, [texts[i % 3] for i in range(5)])
    with open(record["files"]["metrics"]) as f:
        metrics = json.load(f)
    assert metrics["clip_score_w100"] == pytest.approx(expected["clip_score_w100"], abs=1e-6)
    assert metrics == json.loads(json.dumps(record, default=str))
    assert record["fid"] > 0 and record["prompts_truncated"] == 0


def test_main_eval_prompts_images_depend_on_seed_and_index_only(prompt_run):
    """Another batch size gives the same bytes; a rerun samples only the missing images; the same
    run folder with other prompts is refused."""
    tmp, record = prompt_run
    run_dir = os.path.dirname(record["files"]["metrics"])
    want = pngs(tmp / "out" / os.path.basename(run_dir) / "images")
    assert len(set(want.values())) == 5  # prompts cycle, images do not
    other = run_eval(t2i_argv(tmp / "bsz5", tmp / "coco.txt", "--no_fid", "--eval_bsz", "5"))
    assert pngs(tmp / "bsz5" / os.path.basename(run_dir) / "images") == want
    os.remove(os.path.join(run_dir, "images", "000003.png"))
    again = run_eval(t2i_argv(tmp / "out", tmp / "coco.txt", "--no_fid"))
    assert again["generated_this_run"] == 1 and again["found_on_disk"] == 4
    assert pngs(tmp / "out" / os.path.basename(run_dir) / "images") == want
    assert other["generated_this_run"] == 5
    (tmp / "other.txt").write_text("a thin 8\n")
    name = ("--run_name", os.path.basename(run_dir))
    with pytest.raises(ValueError, match="prompts_sha256"):
        run_eval(t2i_argv(tmp / "out", tmp / "other.txt", "--no_fid", *name))


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"--prompts": None, "--text_encoder": None},
            "the model is text-to-image: give --prompts FILE",
        ),
        (
            {"--model_config": "{vocab_size: 16384}"},
            "--prompts is for text-to-image models; this model is class-conditional",
        ),
        ({"--text_encoder": None}, "--text_encoder: the model records no text encoder"),
        (
            {"--model_config": TEXT_MODEL.replace("256", "64")},
            "--text_encoder: .* gives 256-d features, the model takes 64-d",
        ),
        ({"--no_fid": None}, "--prompts: FID needs the statistics of real images"),
        (
            {"--prompts": None, "--text_encoder": None, "--clip_model": "x"},
            "--clip_model is for text-to-image models",
        ),
        ({"--prompts": "missing.txt"}, "--prompts .*missing.txt: cannot be read"),
    ],
)
def test_main_eval_prompt_errors(tmp_path, capsys, change, message):
    import main_eval

    (tmp_path / "p.txt").write_text("a red 7\n")
    argv = t2i_argv(tmp_path / "out", tmp_path / "p.txt", "--no_fid")
    for flag, value in change.items():
        if flag in argv:
            i = argv.index(flag)
            del argv[i : i + (1 if flag == "--no_fid" else 2)]
        if value is not None:
            argv += [flag, str(tmp_path / value) if value.endswith(".txt") else value]
    assert main_eval.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(f"error: {message}", err[0]), err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.png"))


# ------------------------------------------------------------------------ editing with a caption

TEXT = dict(embed_dim=32, depth=2, num_heads=4, condition="text", proj_dropout=0.0)


@pytest.fixture(scope="module")
def text_model():
    from lpd.models import build_lpd

    torch.manual_seed(0)
    m = build_lpd(img_size=64, vocab_size=24, text_dim=12, max_text_tokens=8, **TEXT)
    with torch.no_grad():
        m.text.pos.normal_(0, 0.5)
        m.text.null.normal_(0, 0.5)
    return m.eval()


def test_text_editing_keeps_known_tokens_and_decodes_as_the_training_pass(text_model):
    """Greedy editing: the kept tokens come back exactly, every regenerated token is the argmax of
    the training pass (text prefix, known tokens first) fed the result, padded caption rows change
    nothing and the caption matters."""
    from lpd.editing import edit_tokens
    from lpd.sampling import SamplingConfig
    from lpd.schedules import scaled_group_sizes

    g = torch.Generator().manual_seed(3)
    B, N, L = 3, 16, 5
    tokens = torch.randint(0, 24, (B, N), generator=g)
    keep = np.zeros((B, N), bool)
    keep[:, [0, 1, 4, 5, 10]] = True
    features = torch.randn(B, L, 12, generator=g)
    mask = torch.arange(L)[None] < torch.tensor([[5], [2], [3]])
    opts = dict(steps=4, sampling=SamplingConfig(order="raster"), greedy=True)
    out = edit_tokens(text_model, tokens, keep, (features, mask), **opts)
    assert torch.equal(out[torch.as_tensor(keep)], tokens[torch.as_tensor(keep)])
    known, unknown = np.flatnonzero(keep[0]), np.flatnonzero(~keep[0])
    orders = torch.as_tensor(np.concatenate([known, unknown])).repeat(B, 1)
    sizes = [len(known), *scaled_group_sizes(len(unknown), 4, 64)]
    with torch.no_grad():
        logits = text_model.logits(out, None, orders, sizes, text=features, cond_mask=mask)
    assert torch.equal(logits[:, len(known) :].argmax(-1), out[:, unknown])
    noise = 50 * torch.randn(B, L + 2, 12, generator=g)
    padded = torch.where(F.pad(mask, (0, 2))[..., None], F.pad(features, (0, 0, 0, 2)), noise)
    same = edit_tokens(text_model, tokens, keep, (padded, F.pad(mask, (0, 2))), **opts)
    assert torch.equal(same, out)
    other = edit_tokens(text_model, tokens, keep, (features.flip(0), mask.flip(0)), **opts)
    assert not torch.equal(other, out)
    guided = edit_tokens(
        text_model,
        tokens,
        keep,
        (features, mask),
        steps=3,
        sampling=SamplingConfig(cfg=3.0),
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(guided[torch.as_tensor(keep)], tokens[torch.as_tensor(keep)])
    with pytest.raises(ValueError, match=r"\(features, mask\) of 3 captions"):
        edit_tokens(text_model, tokens, keep, (features[:2], mask[:2]), **opts)


def _text_checkpoint(path, record):
    from lpd.models import LPD, LPDConfig

    config = LPDConfig(img_size=256, vocab_size=4, text_dim=256, text_encoder=record, **TEXT)
    torch.save({"model": LPD(config).state_dict(), "model_config": config.to_dict()}, path)


def test_the_edit_command_line_takes_a_prompt(tmp_path, capsys):
    from PIL import Image

    from lpd.edit import main
    from lpd.text.encoders import WordLlamaEncoder

    record = WordLlamaEncoder().record
    _text_checkpoint(tmp_path / "t2i.pth", record)
    digit = np.zeros((256, 256, 3), np.uint8)
    digit[64:192, 96:160] = 255
    Image.fromarray(digit).save(tmp_path / "digit.png")
    base = [
        *(
            "--config",
            os.path.join(ROOT, "configs", "demo.yaml"),
            "--image",
            str(tmp_path / "digit.png"),
        ),
        *("--region", "bottom", "--steps", "4", "--num", "2", "--cfg", "3.0"),
    ]
    ckpt = ("--pretrained_ckpt", str(tmp_path / "t2i.pth"))
    out = str(tmp_path / "out" / "e.png")
    assert main([*base, *ckpt, "--prompt", "a bold seven", "--output", out]) == 0
    for k in (0, 1):
        with Image.open(tmp_path / "out" / f"e_{k}.png") as im:
            assert np.array_equal(np.asarray(im)[:128], digit[:128])  # the known half, exactly
    capsys.readouterr()

    def refused(argv, message):
        assert main([*base, *argv, "--output", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err

    refused([*ckpt, "--label", "3"], "the model is text-to-image: give --prompt TEXT")
    _text_checkpoint(tmp_path / "other.pth", {**record, "digest": "0" * 64})
    other = ("--pretrained_ckpt", str(tmp_path / "other.pth"))
    refused([*other, "--prompt", "a 7"], "was made with the text encoder")
    from lpd.models import LPD, LPDConfig

    config = LPDConfig(img_size=256, embed_dim=32, depth=2, num_heads=4, vocab_size=4)
    torch.save(
        {"model": LPD(config).state_dict(), "model_config": config.to_dict()}, tmp_path / "c.pth"
    )
    refused(
        ["--pretrained_ckpt", str(tmp_path / "c.pth"), "--prompt", "a 7"], "--prompt is for text"
    )
    assert not (tmp_path / "x.png").exists()


def test_main_eval_uses_the_text_encoder_the_checkpoint_records(tmp_path):
    from lpd.text.encoders import WordLlamaEncoder

    record = WordLlamaEncoder().record
    _text_checkpoint(tmp_path / "t2i.pth", record)
    _text_checkpoint(tmp_path / "other.pth", {**record, "digest": "0" * 64})
    (tmp_path / "p.jsonl").write_text('{"caption": "a thin 1"}\n{"caption": "two"}\n')
    argv = [
        *("--tokenizer", "palette", "--vq_config", "{levels: 4}", "--prompts"),
        *(str(tmp_path / "p.jsonl"), "--num_images", "2", "--eval_bsz", "2"),
        *("--generation_steps", "4", "--no_fid", "--no_progress", "--output_dir"),
        str(tmp_path / "out"),
    ]
    got = run_eval([*argv, "--pretrained_ckpt", str(tmp_path / "t2i.pth")])
    assert got["settings"]["labels"]["text_encoder"] == record and got["generated_this_run"] == 2
    with pytest.raises(ValueError, match="was made with the text encoder"):
        run_eval([*argv, "--pretrained_ckpt", str(tmp_path / "other.pth")])
    with pytest.raises(ValueError, match="was made with the text encoder"):
        run_eval(
            [*argv, "--pretrained_ckpt", str(tmp_path / "other.pth"), "--text_encoder", "wordllama"]
        )


def test_prompt_tokens_depend_on_seed_index_and_prompt_only(tmp_path):
    """lpd.evaluate with a PromptSet: the same tokens for any batch size and from two shards into
    one run folder; image i takes prompt i mod P (cycling = the prompts written out)."""
    from lpd import evaluate as E
    from lpd.models import build_lpd
    from lpd.sampling import SamplingConfig
    from lpd.text.encoders import WordLlamaEncoder
    from lpd.text.prompts import PromptSet
    from lpd.tokenizer import PaletteTokenizer

    torch.manual_seed(2)
    model = build_lpd(img_size=64, vocab_size=256, text_dim=256, max_text_tokens=16, **TEXT)
    palette = PaletteTokenizer(256)
    texts, encoder = ["a red 7", "seven in the top left corner, bold", "x"], WordLlamaEncoder()
    prompts = PromptSet(texts, "0" * 64, "p.txt", encoder)
    sampling, sizes, seed = SamplingConfig(cfg=3.0), [1, 3, 4, 8], 1

    def spec(labels, eval_bsz=64):
        return E.RunSpec(7, sizes, labels=labels, seed=seed, eval_bsz=eval_bsz)

    ref = E.generate_images(model.eval(), palette, spec(prompts), sampling)
    for bsz in (1, 3):
        got = E.generate_images(model, palette, spec(prompts, bsz), sampling)
        assert np.array_equal(got.tokens, ref.tokens)
    written = PromptSet([texts[i % 3] for i in range(7)], "1" * 64, "q.txt", encoder)
    got = E.generate_images(model, palette, spec(written), sampling)
    assert np.array_equal(got.tokens, ref.tokens)
    other = PromptSet(["a blue 2 on the right"], "2" * 64, "r.txt", encoder)
    got = E.generate_images(model, palette, spec(other), sampling)
    assert not np.array_equal(got.tokens, ref.tokens)
    run = tmp_path / "run"
    E.prepare_run_dir(run, E.run_settings(model, palette, spec(prompts), sampling), 16)
    for rank in (1, 0):
        E.generate_images(
            model, palette, spec(prompts, 2), sampling, output_dir=run, shard=(rank, 2)
        )
    assert np.array_equal(np.load(run / "tokens.npy"), ref.tokens)
