"""YAML configs for the entry points: ``--config FILE.yaml`` sets defaults, flags override them.

A config file is a flat mapping whose keys are the entry point's flag names (``eval_bsz``,
``generation_steps``, ...), plus two optional nested mappings understood by every entry point:

* ``model_config``: keyword arguments of :func:`lpd.models.build_lpd` (``embed_dim``, ``depth``,
  ``num_heads``, ...); when present it replaces the ``--model`` preset.
* ``vq_config``: keyword arguments of :func:`lpd.tokenizer.build_vq` (``ch``, ``z_channels``, ...).

Unknown keys are an error (a typo in a config must not be silently ignored).
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Sequence

import yaml

__all__ = ["load_config", "parse_args_with_config", "ConfigError"]


class ConfigError(ValueError):
    """A config file that cannot be read or does not fit the entry point."""


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML config file into a dict (empty file -> ``{}``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist; pass a YAML file such as configs/tiny.yaml")
    with open(path, "r", encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of flag names to values, got {type(data).__name__}")
    return data


def parse_args_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` with ``parser``; values from ``--config FILE`` become defaults that flags override.

    The parser must define ``--config``.  Keys of the file must be destinations of the parser.
    """
    pre, _ = parser.parse_known_args(argv)
    path = getattr(pre, "config", None)
    if path:
        cfg = load_config(path)
        known = {a.dest for a in parser._actions}
        unknown = sorted(k for k in cfg if k not in known)
        if unknown:
            raise ConfigError(
                f"config file {path!r} has keys this entry point does not know: {unknown}; "
                f"see --help for the accepted names"
            )
        parser.set_defaults(**cfg)
    return parser.parse_args(argv)
