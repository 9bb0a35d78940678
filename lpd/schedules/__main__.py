"""``python -m lpd.schedules``: print a schedule, or write the released JSON tables."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence

from lpd.files import atomic_write_bytes
from lpd.schedules import group_sizes, released_files


def write_released_files(folder: str, overwrite: bool = False) -> list[str]:
    """Write :func:`released_files` under ``folder`` (atomically); returns the paths written. Files
    of the same text are left alone, others replaced only with ``overwrite`` (else ValueError)."""
    todo = {}
    for rel, text in released_files().items():
        path = os.path.join(folder, rel)
        with contextlib.suppress(OSError, UnicodeDecodeError), open(path, encoding="utf-8") as f:
            if f.read() == text:
                continue
        todo[path] = text.encode()
    if (refused := [p for p in todo if os.path.lexists(p)]) and not overwrite:
        raise ValueError(
            f"{', '.join(refused)} exist(s) and differ(s) from the released tables; nothing was "
            f"written: choose another folder, or --overwrite to replace them"
        )
    for path, data in todo.items():
        atomic_write_bytes(path, lambda f, data=data: f.write(data))
    return list(todo)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lpd.schedules``: ``show`` a schedule, or ``write`` the released JSON tables;
    user errors print one ``error:`` line and return 2."""
    text = "Group-size schedules: print one, or write the released JSON tables."
    p = argparse.ArgumentParser("python -m lpd.schedules", allow_abbrev=False, description=text)
    sub = p.add_subparsers(dest="command", required=True)
    text = "print the group sizes of a resolution and step count (released, else cosine)"
    add = sub.add_parser("show", help=text).add_argument
    add("--img_size", type=int, default=256)
    add("--steps", type=int, default=20, help="decoding steps")
    add("--vqgan_stride", type=int, default=16, help="tokenizer down-sampling factor")
    text = "write group_sizes_lookup.json and group_sizes_training/*.json into FOLDER (the "
    add = sub.add_parser("write", help=text + "repository keeps them in orders/)").add_argument
    add("folder", help="the folder to write into")
    text = "replace files that differ from the released tables"
    add("--overwrite", action="store_true", help=text)
    args = p.parse_args(argv)
    try:
        if args.command == "show":
            print(json.dumps(group_sizes(args.img_size, args.steps, args.vqgan_stride)))
            return 0
        if os.path.exists(args.folder) and not os.path.isdir(args.folder):
            raise ValueError(f"FOLDER {args.folder} is a file; give a folder")
        written = write_released_files(args.folder, args.overwrite)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    up_to_date = f"{args.folder}: the released tables are up to date"
    print("\n".join(f"wrote {w}" for w in written) or up_to_date)
    return 0


if __name__ == "__main__":
    sys.exit(main())
