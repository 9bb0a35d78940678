"""The compositional text-to-image testbed: scenes, captions, the held-out split, and the judge
(real scenes score near 1, scenes judged against other scenes' captions near chance)."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from lpd.demo.digits import load_digits_dataset, split_indices
from lpd.demo.t2i_data import (
    GROUPS,
    QUADRANTS,
    TEMPLATES,
    WORDS,
    Scene,
    caption,
    heldout_combinations,
    make_examples,
    render,
)
from lpd.demo.t2i_judge import ATTRIBUTES, T2IJudge


@pytest.fixture(scope="module")
def judge():
    return T2IJudge.fit(seed=0, epochs=4, resamples=200)


def _combo(s):
    if s.kind == "pair":
        return s.layout, s.digits
    return (
        ("small", (s.digits[0], s.place))
        if s.kind == "small"
        else ("full_stroke", (s.digits[0], s.stroke))
    )


def test_examples_are_deterministic_and_respect_the_split():
    held = heldout_combinations(0)
    assert held == heldout_combinations(0) and held != heldout_combinations(1)
    assert len(held["small"]) == 10 and len(held["full_stroke"]) == 5 and len(held["stacked"]) == 22
    train_src, test_src = set(split_indices("train").tolist()), set(split_indices("test").tolist())
    for group in GROUPS:
        ex = make_examples(300, group, seed=2)
        assert ex == make_examples(300, group, seed=2) and ex != make_examples(300, group, seed=3)
        assert {e.group for e in ex} == {group}
        for e in ex:
            name, k = e.template.rsplit("/", 1)
            last = int(k) == len(TEMPLATES[name]) - 1
            assert last == (group == "heldout_phrasing"), e
            assert set(e.scene.sources) <= (train_src if group == "train" else test_src)
            if e.scene.kind == "full" and not e.scene.stroke:
                assert group != "heldout_combination"
                continue
            assert (_combo(e.scene)[1] in held[_combo(e.scene)[0]]) == (
                group == "heldout_combination"
            ), e
        kinds = {e.scene.kind for e in ex}
        assert kinds == ({"small", "pair", "full"}), kinds


def test_the_small_share_sets_the_mix_of_one_digit_scenes():
    def small_share(**kw):
        ex = make_examples(400, "train", seed=0, **kw)
        return np.mean([e.scene.kind == "small" for e in ex if e.scene.kind != "pair"])

    assert small_share(pairs=0, small=1.0) == 1.0 and small_share(small=0.0) == 0.0
    assert 0.18 < small_share() < 0.32 and 0.42 < small_share(small=0.5) < 0.58
    ex = make_examples(400, "train", seed=0, pairs=0, small=0.0)
    assert {e.scene.kind for e in ex} == {"full"} and any(e.scene.stroke for e in ex)


def test_fillers_put_random_words_between_the_words_of_a_share_of_captions():
    from lpd.demo.t2i import with_fillers
    from lpd.text.encoders import make_text_encoder

    enc = make_text_encoder("wordllama", "cpu", max_text_tokens=12)
    captions = [e.caption for e in make_examples(400, "train", seed=0)]
    ids = enc.token_ids(captions)[0]
    out = with_fillers(ids, enc, 0.5, seed=0)
    assert out == with_fillers(ids, enc, 0.5, seed=0) != with_fillers(ids, enc, 0.5, seed=1)
    assert with_fillers(ids, enc, 0.0, seed=0) == [x[:12] for x in ids]
    tok, changed = enc.tokenizer.id_to_token, 0
    for x, y in zip(ids, out):
        matched, extra = 0, []  # the caption's tokens in order, the others between them
        for i, t in enumerate(y):
            if matched < len(x) and t == x[matched]:
                matched += 1
                continue
            extra.append(t)
            assert tok(t)[0] == "\u2581" and tok(t)[1:].isalpha(), tok(t)
            assert i == len(y) - 1 or tok(y[i + 1])[0] == "\u2581", [tok(u) for u in y]
        assert len(extra) <= 2 and y[0] == x[0] and len(y) <= 12
        assert matched == len(x) or len(y) == 12
        changed += bool(extra)
    assert 150 < changed < 250


def test_function_word_fillers_are_drawn_from_their_list_at_their_share():
    from lpd.demo.t2i import FUNCTION_WORDS, with_fillers
    from lpd.text.encoders import make_text_encoder

    enc = make_text_encoder("wordllama", "cpu", max_text_tokens=24)
    ids = enc.token_ids([e.caption for e in make_examples(400, "train", seed=0)])[0]
    common = {enc.tokenizer.token_to_id("\u2581" + w) for w in FUNCTION_WORDS}

    def fillers(share):  # the tokens put in: each caption's tokens less the original ones
        out = with_fillers(ids, enc, 1.0, 0, share)
        return [t for x, y in zip(ids, out) for t in (Counter(y) - Counter(x)).elements()]

    only = fillers(1.0)
    assert set(only) <= common and 400 < len(only) < 800
    mixed = fillers(0.5)
    assert 0.35 < sum(t in common for t in mixed) / len(mixed) < 0.65
    assert with_fillers(ids, enc, 0.5, 0) == with_fillers(ids, enc, 0.5, 0, 0.0)


def test_captions_state_the_attributes():
    for e in make_examples(400, "train", seed=0) + make_examples(100, "heldout_phrasing", seed=0):
        s, text = e.scene, e.caption
        for d in s.digits:
            assert re.search(rf"\b({d}|{WORDS[d]})\b", text), e
        assert (s.stroke is not None) == bool(re.search(r"\b(thin|bold)\b", text)), e
        assert (s.place is not None) == any(q in text for q in QUADRANTS), e
        assert not re.search(r"\ba (8|eight)\b", text), e
    s = Scene((3, 5), (0, 1), layout="side by side")
    assert caption(s, TEMPLATES["side by side"][0], (False, True)) == "a 3 to the left of a five"
    assert caption(s, TEMPLATES["side by side"][1], (False, True)) == "a five to the right of a 3"
    assert caption(Scene((8,), (0,), "bold"), "a {s} {d}", (True,)) == "a bold eight"
    assert caption(Scene((8,), (0,)), "a {d}", (False,)) == "an 8"


def test_rendering():
    tokens, _ = load_digits_dataset("all")
    src = [5, 77, 1000]
    assert torch.equal(
        render([Scene((0,), (i,)) for i in src]), tokens[src]
    )  # the demo's digits exactly
    small = render([Scene((0,), (5,), place=q) for q in QUADRANTS])
    for k, q in enumerate(QUADRANTS):
        r, c = (0 if q.startswith("top") else 8), (0 if q.endswith("left") else 8)
        inside = torch.zeros(16, 16, dtype=torch.bool)
        inside[r : r + 8, c : c + 8] = True
        assert small[k][inside].sum() > 0 and small[k][~inside].sum() == 0
    pair = render(
        [Scene((1, 2), (5, 6), layout="side by side"), Scene((1, 2), (5, 6), layout="stacked")]
    )
    assert torch.equal(pair[0][4:12, :8], small[0][:8, :8]) and torch.equal(
        pair[1][:8, 4:12], small[0][:8, :8]
    )
    mass = [render([Scene((0,), (5,), s)]).sum().item() for s in ("thin", None, "bold")]
    assert mass[0] < mass[1] < mass[2]


@pytest.mark.parametrize("group", ["seen", "heldout_phrasing", "heldout_combination"])
def test_judge_scores_real_scenes_near_one(judge, group):
    scenes = [e.scene for e in make_examples(300, group, seed=7)]
    result = judge.score(render(scenes), scenes)
    assert result["num_images"] == 300
    for attr in ATTRIBUTES:
        r = result[attr]
        assert r["accuracy"] >= 0.9, (attr, r)
        assert r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] and r["n"] > 10


def test_judge_scores_mismatched_captions_near_chance(judge):
    scenes = [e.scene for e in make_examples(600, "seen", seed=8)]
    shuffled = scenes[:]
    random.Random(0).shuffle(shuffled)
    result = judge.score(render(scenes), shuffled)
    assert result["digit"]["accuracy"] < 0.2  # chance 0.1
    assert result["position"]["accuracy"] < 0.45  # chance 0.25
    assert result["stroke"]["accuracy"] < 0.55  # chance about 1/3
    assert (
        result["relation"]["accuracy"] < 0.1 and result["digits"]["accuracy"] < 0.1
    )  # chance 1/45
    # an empty grid: no digit, nothing right except what a blank grid satisfies by chance
    blank = judge.judge(
        torch.zeros(2, 16, 16, dtype=torch.long),
        [Scene((3,), (0,), "bold"), Scene((3,), (0,), place="top left")],
    )
    assert blank[0]["stroke"] is False and blank[0]["size"] is False and blank[1]["size"] is True


def _source(digit):
    test = split_indices("test")
    return int(test[load_digits_dataset("test")[1].numpy() == digit][0])


def test_judge_per_attribute_verdicts(judge):
    s_small = Scene((4,), (_source(4),), place="bottom right")
    img = render([s_small])
    v = judge.judge(img, [Scene((4,), (0,), place="bottom right")])[0]
    assert v["digit"] is v["small digit"] is True and "full digit" not in v
    v = judge.judge(img, [Scene((7,), (0,), place="top left")])[0]
    assert v["position"] is False and v["size"] is True and v["small digit"] is False
    v = judge.judge(img, [Scene((4,), (0,))])[0]  # asked for a full-size 4: wrong size
    assert v["size"] is False and v["full digit"] is v["digit"] and "small digit" not in v
    pair = render([Scene((3, 5), (_source(3), _source(5)), layout="stacked")])
    assert judge.judge(pair, [Scene((3, 5), (0, 0), layout="stacked")])[0] == {
        "digits": True,
        "relation": True,
    }
    assert judge.judge(pair, [Scene((5, 3), (0, 0), layout="stacked")])[0] == {
        "digits": True,
        "relation": False,
    }
    assert np.isclose(
        judge.score(pair, [Scene((5, 3), (0, 0), layout="stacked")])["relation"]["accuracy"], 0.0
    )


def test_testbed_command_end_to_end(tmp_path, capsys):
    """``python -m lpd.demo --task t2i``, shortened: a table per group (and for the real scenes),
    the grid, and a rerun that reuses the trained model and scores the same."""
    from lpd.demo.t2i import main

    out = str(tmp_path / "t2i")
    argv = ["--output_dir", out, "--train_examples", "48", "--epochs", "1", "--num_images", "12"]
    argv += ["--classifier_epochs", "2", "--resamples", "50", "--grid_images", "3", "--steps", "4"]
    assert main(argv) == 0
    first = json.loads(open(f"{out}/metrics.json").read())
    assert list(first["scores"]) == [
        f"{g}{s}"
        for g in ("seen", "heldout_phrasing", "heldout_combination")
        for s in ("", " (real scenes)")
    ]
    for name, scores in first["scores"].items():
        assert scores["num_images"] == 12 and ("digit" in scores or "digits" in scores), name
        for attr in set(scores) & set(ATTRIBUTES):
            lo, hi = scores[attr]["ci95"]
            assert lo <= scores[attr]["accuracy"] <= hi
    table = open(f"{out}/table.md").read()
    assert table.count("\n| ") == 7 and table.count(": ") >= 9  # header, 6 rows; 9 captions
    assert Image.open(f"{out}/samples.png").size[1] > 0
    ckpt = torch.load(f"{out}/train/checkpoint-last.pth", weights_only=True)
    assert ckpt["model_config"]["condition"] == "text" and ckpt["model_config"]["text_encoder"]
    capsys.readouterr()
    assert main(argv) == 0
    assert "reusing the trained model" in capsys.readouterr().out
    assert json.loads(open(f"{out}/metrics.json").read())["scores"] == first["scores"]
    assert main([*argv[:2], "--epochs", "2"]) == 2  # other settings: refused, nothing lost
    assert "other settings" in capsys.readouterr().err
    assert main(["--output_dir", out, "--steps", "0"]) == 2
    assert "--steps must be a positive integer" in capsys.readouterr().err
    assert main([*argv, "--function_words", "0.5"]) == 2  # another recipe: refused
    assert "other settings" in capsys.readouterr().err
    assert main(["--output_dir", out, "--filler", "0", "--function_words", "0.5"]) == 2
    assert "give --filler above 0" in capsys.readouterr().err
