"""Frozen text encoders behind one interface: ``tokenize`` captions to padded ids, ``encode`` ids to
features ``[B, L, C]``, and a ``record`` (kind, name, width, digest of weights and tokenizer) that a
checkpoint keeps so that another encoder can be refused.

* ``transformers``: any Hugging Face encoder by Hub name or folder (``T5EncoderModel`` for T5 /
  FLAN-T5 / mT5 / UMT5, else ``AutoModel`` with ``last_hidden_state``); bf16 on GPUs.
* ``wordllama``: the LLaMA-2 static token embeddings (32,000 x 256) shipped in the ``wordllama``
  wheel, read from its files directly (works offline).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lpd.files import state_dict_digest

__all__ = [
    "MAX_TEXT_TOKENS",
    "TextEncoder",
    "HFTextEncoder",
    "WordLlamaEncoder",
    "make_text_encoder",
    "check_encoder_record",
]

MAX_TEXT_TOKENS = 120
_T5_TYPES = ("t5", "mt5", "umt5")


class TextEncoder:
    """The interface; a subclass sets ``kind``, ``name``, ``width``, ``pad_id``, ``device`` and
    ``digest`` and implements ``_ids`` (token id lists) and ``_features`` (ids, mask ->
    features)."""

    kind: str
    name: str
    width: int
    pad_id: int
    digest: str
    device: torch.device

    def __init__(self, max_text_tokens: int = MAX_TEXT_TOKENS) -> None:
        if (
            isinstance(max_text_tokens, bool)
            or not isinstance(max_text_tokens, int)
            or max_text_tokens < 2
        ):
            raise ValueError(f"max_text_tokens must be an integer >= 2, got {max_text_tokens!r}")
        self.max_text_tokens = max_text_tokens

    @property
    def record(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "width": self.width, "digest": self.digest}

    def _ids(self, captions: list[str], max_length: int | None) -> list[list[int]]:
        raise NotImplementedError

    def _features(self, ids: Tensor, mask: Tensor) -> Tensor:
        raise NotImplementedError

    def token_ids(self, captions: Sequence[str]) -> tuple[list[list[int]], int]:
        """Id lists of ``captions``, each at most ``max_text_tokens`` long, and how many were
        truncated."""
        captions = [c if isinstance(c, str) else _not_text(c) for c in captions]
        ids = self._ids(captions, None)
        long = [i for i, x in enumerate(ids) if len(x) > self.max_text_tokens]
        if long:  # the tokenizer's own truncation keeps its end token
            for i, x in zip(long, self._ids([captions[i] for i in long], self.max_text_tokens)):
                ids[i] = x[: self.max_text_tokens]
        return ids, len(long)

    def pad(self, ids: Sequence[Sequence[int]], length: int | None = None) -> tuple[Tensor, Tensor]:
        """``(ids int64 [B, L], mask bool [B, L])`` on the CPU, padded to the longest (or
        ``length``)."""
        length = max((len(x) for x in ids), default=0) if length is None else length
        out = torch.full((len(ids), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), length), dtype=torch.bool)
        for i, x in enumerate(ids):
            out[i, : len(x)] = torch.as_tensor(list(x), dtype=torch.long)
            mask[i, : len(x)] = True
        return out, mask

    def tokenize(
        self, captions: Sequence[str], length: int | None = None
    ) -> tuple[Tensor, Tensor, int]:
        """``(ids int64 [B, L], mask bool [B, L], n_truncated)``: captions truncated to
        ``max_text_tokens``."""
        ids, n_truncated = self.token_ids(captions)
        return *self.pad(ids, length), n_truncated

    @torch.no_grad()
    def encode(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Features float32 ``[B, L, C]`` on ``self.device``; the padding rows are zero."""
        if ids.dim() != 2 or mask.shape != ids.shape or mask.dtype != torch.bool:
            raise ValueError(
                f"ids [B, L] and a bool mask of the same shape expected, got "
                f"{tuple(ids.shape)} and "
                f"{mask.dtype} {tuple(mask.shape)}"
            )
        ids, mask = ids.to(self.device), mask.to(self.device)
        if ids.shape[1] == 0:
            return torch.zeros((*ids.shape, self.width), device=self.device)
        return self._features(ids, mask).float() * mask[..., None]


def _not_text(value: Any) -> str:
    raise TypeError(f"captions must be strings, got {type(value).__name__}")


def _text_digest(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8") + b"\0")
    return h.hexdigest()


class HFTextEncoder(TextEncoder):
    """A ``transformers`` encoder by Hub name or folder, frozen, in ``dtype`` (default: bf16 on
    CUDA, else float32). The weight digest is taken in float32 before the cast, so it does not
    depend on ``dtype``."""

    kind = "transformers"

    def __init__(
        self,
        name: str,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        max_text_tokens: int = MAX_TEXT_TOKENS,
    ) -> None:
        super().__init__(max_text_tokens)
        from transformers import AutoConfig, AutoModel, AutoTokenizer, T5EncoderModel

        self.name, self.device = name, torch.device(device)
        try:
            config = AutoConfig.from_pretrained(name)
            self.tokenizer = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(
                f"text encoder {name!r} cannot be loaded ({e}); give a Hugging Face model name "
                f"(in the Hub cache when offline) or a folder saved with save_pretrained"
            ) from e
        cls = T5EncoderModel if config.model_type in _T5_TYPES else AutoModel
        model = cls.from_pretrained(name, dtype=torch.float32)
        model.requires_grad_(False).eval()
        self.width = int(getattr(config, "d_model", None) or config.hidden_size)
        self.pad_id = int(
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        )
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        vocab = (
            backend.to_str()
            if backend is not None
            else repr(sorted(self.tokenizer.get_vocab().items()))
        )
        self.digest = _text_digest(state_dict_digest(model), vocab)
        dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.model = model.to(self.device, dtype)

    def _ids(self, captions: list[str], max_length: int | None) -> list[list[int]]:
        if not captions:
            return []
        out = self.tokenizer(captions, truncation=max_length is not None, max_length=max_length)
        return [list(x) for x in out["input_ids"]]

    def _features(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state


def wordllama_files() -> tuple[str, str]:
    """The tokenizer JSON and the 256-d embedding safetensors inside the installed ``wordllama``
    wheel."""
    try:
        import wordllama
    except ImportError as e:
        raise FileNotFoundError(
            "the wordllama text encoder needs the wordllama package: pip install "
            "wordllama (or pip install 'lpd[t2i]')"
        ) from e
    root = os.path.dirname(wordllama.__file__)
    files = (
        os.path.join(root, "tokenizers", "l2_supercat_tokenizer_config.json"),
        os.path.join(root, "weights", "l2_supercat_256.safetensors"),
    )
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(
            f"the wordllama package lacks {missing}; reinstall wordllama==0.4.0.post1"
        )
    return files


class WordLlamaEncoder(TextEncoder):
    """LLaMA-2 static token embeddings (no context): feature ``i`` is the embedding of token
    ``i``."""

    kind, name = "wordllama", "l2_supercat_256"

    def __init__(
        self, device: torch.device | str = "cpu", max_text_tokens: int = MAX_TEXT_TOKENS
    ) -> None:
        super().__init__(max_text_tokens)
        from safetensors.torch import load_file

        from tokenizers import Tokenizer

        tok_file, weights_file = wordllama_files()
        self.tokenizer = Tokenizer.from_file(tok_file)
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        weight = load_file(weights_file)["embedding.weight"]
        self.width, self.pad_id, self.device = int(weight.shape[1]), 0, torch.device(device)
        with open(tok_file, "rb") as f:
            self.digest = _text_digest(
                state_dict_digest({"embedding.weight": weight}),
                hashlib.sha256(f.read()).hexdigest(),
            )
        self.weight = weight.to(self.device, torch.float32)

    def _ids(self, captions: list[str], max_length: int | None) -> list[list[int]]:
        if max_length is not None:
            self.tokenizer.enable_truncation(max_length)
        try:
            return [list(e.ids) for e in self.tokenizer.encode_batch(captions)]
        finally:
            self.tokenizer.no_truncation()

    def _features(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.weight[ids]


def make_text_encoder(
    name: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    max_text_tokens: int = MAX_TEXT_TOKENS,
) -> TextEncoder:
    """``"wordllama"`` or a ``transformers`` model name / folder (e.g. ``google/flan-t5-xl``)."""
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"text encoder: give 'wordllama' or a Hugging Face model name or folder, got {name!r}"
        )
    if name == "wordllama":
        return WordLlamaEncoder(device, max_text_tokens)
    return HFTextEncoder(name, device, dtype, max_text_tokens)


def check_encoder_record(
    expected: dict[str, Any], encoder: TextEncoder, where: str = "the checkpoint"
) -> None:
    """ValueError unless ``encoder`` is the one ``expected`` records (same kind, width and
    digest)."""
    got = encoder.record
    diff = [k for k in ("kind", "width", "digest") if expected.get(k) != got[k]]
    if diff:
        raise ValueError(
            f"{where} was made with the text encoder {expected.get('name')!r} "
            f"({expected.get('kind')}, width {expected.get('width')}), not {got['name']!r} "
            f"({got['kind']}, width {got['width']}; differs in {', '.join(diff)}); "
            f"give the same text encoder"
        )
