"""Text encoders: a tiny T5 built and saved here, loaded by path; the wordllama embeddings
offline."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lpd.text.encoders import (
    HFTextEncoder,
    WordLlamaEncoder,
    check_encoder_record,
    make_text_encoder,
)

WORDS = "a the small big thin bold seven three five digit in top left right bottom of to".split()


def _tiny_t5(folder, seed=0, d_model=16):
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)
    config = T5Config(
        vocab_size=len(vocab),
        d_model=d_model,
        d_kv=4,
        num_heads=2,
        d_ff=32,
        num_layers=2,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    T5EncoderModel(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    return _tiny_t5(tmp_path_factory.mktemp("t5"))


def test_tiny_t5_by_path(t5_folder):
    enc = make_text_encoder(t5_folder, "cpu", max_text_tokens=6)
    assert isinstance(enc, HFTextEncoder) and enc.width == 16
    ids, mask, n_trunc = enc.tokenize(
        ["a small seven", "three", "a big bold five in the top left of it"]
    )
    assert n_trunc == 1  # the third has 11 tokens
    assert ids.shape == (3, 6) and mask.sum(1).tolist() == [4, 2, 6]
    assert ids[0, :4].tolist() == [3, 5, 9, 1]  # words, then </s>
    assert ids[2, 5].item() == 1  # truncated by the tokenizer: the end token kept
    assert ids[1, 2:].tolist() == [0] * 4 and not mask[1, 2:].any()
    feats = enc.encode(ids, mask)
    assert feats.shape == (3, 6, 16) and feats.dtype == torch.float32
    assert (feats[~mask] == 0).all() and (feats[mask].abs().sum(-1) > 0).all()
    # padding does not change the real rows: the same caption alone, unpadded
    alone = enc.encode(*enc.tokenize(["three"])[:2])
    torch.testing.assert_close(alone[0], feats[1, :2], atol=1e-5, rtol=1e-5)
    # the same as the model run directly
    from transformers import T5EncoderModel

    ref = T5EncoderModel.from_pretrained(t5_folder)(
        input_ids=ids, attention_mask=mask.long()
    ).last_hidden_state
    torch.testing.assert_close(feats[mask], ref[mask], atol=1e-5, rtol=1e-5)
    rec = enc.record
    assert rec["kind"] == "transformers" and rec["name"] == t5_folder and rec["width"] == 16
    assert (
        make_text_encoder(t5_folder, dtype=torch.bfloat16).record == rec
    )  # digest independent of dtype
    check_encoder_record(rec, enc)


def test_another_t5_is_refused(t5_folder, tmp_path):
    other = make_text_encoder(_tiny_t5(tmp_path / "other", seed=1))
    assert other.record["digest"] != make_text_encoder(t5_folder).record["digest"]
    with pytest.raises(ValueError, match="differs in digest"):
        check_encoder_record(make_text_encoder(t5_folder).record, other)


def test_missing_encoder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="text encoder"):
        make_text_encoder(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="max_text_tokens"):
        make_text_encoder("wordllama", max_text_tokens=1)
    with pytest.raises(TypeError, match="strings"):
        make_text_encoder("wordllama").tokenize([3])


def test_wordllama_offline():
    code = (
        "from lpd.text.encoders import make_text_encoder; import torch\n"
        "e = make_text_encoder('wordllama', max_text_tokens=8)\n"
        "ids, mask, n = e.tokenize(['a small seven in the top left', 'a bold 3 ' * 10, ''])\n"
        "f = e.encode(ids, mask)\n"
        "print(e.width, list(ids.shape), mask.sum(1).tolist(), n, list(f.shape), "
        "bool((f[~mask] == 0).all()))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    # width; ids [3, 8]; lengths (the empty caption keeps <s>); one truncated; features; zero pad
    assert out.stdout.strip() == "256 [3, 8] [8, 8, 1] 1 [3, 8, 256] True"


def test_wordllama_features_are_the_embedding_rows():
    from safetensors.torch import load_file

    from lpd.text.encoders import wordllama_files

    enc = WordLlamaEncoder()
    ids, mask, _ = enc.tokenize(["seven", "a thin five"])
    assert ids[:, 0].tolist() == [1, 1]  # <s> first
    weight = load_file(wordllama_files()[1])["embedding.weight"].float()
    feats = enc.encode(ids, mask)
    torch.testing.assert_close(feats[mask], weight[ids[mask]])
    rec = enc.record
    assert rec["kind"] == "wordllama" and rec["width"] == 256 and len(rec["digest"]) == 64
    assert WordLlamaEncoder().record == rec
