"""Prompt files for evaluation: one prompt per line (``.txt``), or JSONL with a ``caption`` per line
(``.jsonl``: LlamaGen's layout); blank lines are skipped. Image ``i`` takes prompt ``i`` modulo
their number."""

from __future__ import annotations

import hashlib
import json
import os

__all__ = ["read_prompts", "prompt_of"]


def read_prompts(path: str | os.PathLike) -> tuple[list[str], str]:
    """The prompts of ``path`` and the SHA-256 of its bytes; ValueError names the file and line."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise FileNotFoundError(f"--prompts {path}: cannot be read ({e.strerror})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"--prompts {path}: not UTF-8 text ({e.reason} at byte {e.start})"
        ) from None
    jsonl, prompts = path.lower().endswith(".jsonl"), []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if not jsonl:
            prompts.append(line.strip())
            continue
        try:
            caption = json.loads(line).get("caption")
        except (ValueError, AttributeError):
            caption = None
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(
                f"--prompts {path} line {n}: expected a JSON object with a non-empty string "
                f'"caption", e.g. {{"caption": "a red apple"}}'
            )
        prompts.append(caption.strip())
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompts (one per line, or JSONL with caption)")
    return prompts, hashlib.sha256(data).hexdigest()


def prompt_of(prompts: list[str], index: int) -> str:
    """The prompt of image ``index``: prompts are cycled when there are more images."""
    return prompts[index % len(prompts)]
