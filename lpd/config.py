"""YAML configs for the entry points: ``--config FILE.yaml`` (flag names to values, ``model_config`` and ``vq_config``
mappings) sets defaults, flags override them. Unknown keys and values of the wrong type are errors."""

from __future__ import annotations

import argparse
import copy
import os
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np
import torch
import yaml

ORDERS = ("lpd", "random", "raster")  # the generation orders


class ConfigError(ValueError):
    """A config file or flag value that cannot be used."""


def new_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The parser of an entry point: no abbreviated flags, :class:`HelpFormatter`."""
    return argparse.ArgumentParser(
        prog=prog, description=description, allow_abbrev=False, formatter_class=HelpFormatter
    )


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` keeps the description's lines; options show a default unless None, off, said."""

    def _format_action(self, action: argparse.Action) -> str:
        d, text = action.default, action.help or ""
        hidden = d is None or d is False or d == argparse.SUPPRESS or "default" in text
        if action.option_strings and not hidden:
            action = copy.copy(action)
            action.help = f"{text} (default: %(default)s)".lstrip()
        return super()._format_action(action)


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML config file into a dict (an empty file is ``{}``)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(
            f"--config {path!r} cannot be read ({e.strerror}); pass a YAML file such as configs/tiny.yaml"
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict | None):
        raise ConfigError(
            f"--config {path!r} must hold a mapping of flag names to values, got {type(data).__name__}"
        )
    return data or {}


def yaml_mapping(text: str | dict) -> dict[str, Any]:
    """Argument type of ``--model_config`` / ``--vq_config``: a YAML (or JSON) mapping such as ``'{depth: 2}'``."""
    if isinstance(text, dict):
        return text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"not a YAML mapping: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"expected a mapping such as '{{embed_dim: 64}}', got {text!r}"
        )
    return value


_SWITCHES = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)


def _check_value(action: argparse.Action, value: Any, path: str) -> Any:
    """A config value as the flag would give it; wrong types are a :class:`ConfigError`."""
    if value is None:
        return value
    where = f"--config {path!r}: {action.dest}"
    if isinstance(action, _SWITCHES):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false (unquoted), got {value!r}")
        return value
    if action.type is yaml_mapping:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return value
    if action.type in (int, float) and not isinstance(value, str):
        kind, what = ((int,), "an integer") if action.type is int else ((int, float), "a number")
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ConfigError(f"{where} must be {what}, got {value!r}")
        value = action.type(value)
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{where} must be one of {list(action.choices)}, got {value!r}")
    return value


def parse_args_with_config(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
    also_known: argparse.ArgumentParser | None = None,
    take: Collection[str] | None = None,
) -> argparse.Namespace:
    """Parse ``argv``; values of ``--config FILE`` become defaults that flags override. Of a config of another entry
    point (``also_known``, its parser; none: any) only the keys in ``take`` (default: every flag of ``parser``) are used."""
    if path := getattr(parser.parse_known_args(argv)[0], "config", None):
        cfg = load_config(path)
        actions = {a.dest: a for a in parser._actions}
        foreign = set(cfg) if also_known is None and take is not None else set()
        foreign |= {a.dest for a in also_known._actions} if also_known is not None else set()
        take = set(actions) if take is None else set(take)
        cfg = {k: v for k, v in cfg.items() if (k in actions and k in take) or k not in foreign}
        if unknown := sorted(k for k in cfg if k not in actions):
            raise ConfigError(
                f"--config {path!r} has keys this entry point does not know: {unknown}; see --help for the names"
            )
        parser.set_defaults(**{k: _check_value(actions[k], v, path) for k, v in cfg.items()})
    return parser.parse_args(argv)


def check_seed(seed: Any, flag: str = "--seed") -> int:
    """A seed in ``[0, 2**64)``."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ConfigError(f"{flag} must be an integer in [0, 2**64), got {seed!r}")
    return seed


def check_run_name(name: str, flag: str = "--run_name") -> str:
    """A folder name that stays inside the output folder (no separators, not ``.``/``..``)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or os.sep in name:
        raise ConfigError(
            f"{flag} {name!r} must be a plain folder name inside --output_dir (no '/', not '..')"
        )
    return name


def check_positive(value: Any, flag: str, error: type[Exception] = ConfigError) -> int:
    """A positive integer (not a bool), else ``error`` naming ``flag``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise error(f"{flag} must be a positive integer, got {value!r}")
    return int(value)


def check_labels(
    labels: Any,
    num: int,
    class_num: int,
    flag: str = "labels",
    error: type[Exception] = ConfigError,
) -> np.ndarray:
    """``num`` class indices in ``0..class_num-1`` (a sequence, array or tensor) as int64, else
    ``error`` naming ``flag``."""
    arr = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if arr.dtype.kind not in "iu" or arr.shape != (num,):
        got = f"{arr.dtype} {list(arr.shape)}"
        raise error(f"{flag} must be {num} integers (one per image), got {got}")
    if arr.size and (arr.min() < 0 or arr.max() >= class_num):
        raise error(f"{flag} must be in 0..{class_num - 1}, got {arr.tolist()[:8]}")
    return arr.astype(np.int64)


def check_order(order: Any, flag: str = "--order") -> str:
    """One of :data:`ORDERS`, else ConfigError naming ``flag``."""
    if order not in ORDERS:
        raise ConfigError(f"{flag} must be one of {list(ORDERS)}, got {order!r}")
    return order


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed that depends only on ``(seed, *keys)`` (non-negative integers)."""
    sequence = np.random.SeedSequence([int(seed), *(int(k) for k in keys)])
    words = sequence.generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])
