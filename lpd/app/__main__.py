"""``python -m lpd.app``: serve the page (127.0.0.1 by default) with the embedded digits model,
a released
preset (``--model lpd_l --img_size 256``) or ``--pretrained_ckpt PATH|REPO``."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence

import torch

from lpd.files import CheckpointError

MB = 1024 * 1024


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lpd.app",
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        default=None,
        help="a released preset (lpd_l, lpd_xl, lpd_xxl); default: the embedded model",
    )
    p.add_argument(
        "--img_size", type=int, default=None, help="256 or 512 (default: 256 for --model)"
    )
    p.add_argument(
        "--pretrained_ckpt",
        default=None,
        help="an export folder, a Hub repository or a checkpoint file",
    )
    p.add_argument(
        "--vqgan_path", default=None, help="the VQ tokenizer file instead of the Hub download"
    )
    p.add_argument(
        "--device", default=None, help="default: cuda if available, else cpu (bf16 on GPUs)"
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)"
    )
    p.add_argument("--port", type=int, default=7860, help="port to serve on (0: any free port)")
    p.add_argument(
        "--share", action="store_true", help="also serve through a public Gradio share link"
    )
    p.add_argument("--max_upload_mb", type=float, default=8.0, help="largest accepted upload")
    p.add_argument(
        "--max_pixels", type=int, default=4096 * 4096, help="largest accepted image, in pixels"
    )
    p.add_argument(
        "--queue_size", type=int, default=100, help="requests that may wait for the device"
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    return p


def _check(args: argparse.Namespace) -> None:
    for flag, low in (("port", 0), ("max_pixels", 64 * 64), ("queue_size", 1), ("threads", 0)):
        if getattr(args, flag) < low or flag == "port" and args.port > 65535:
            raise ValueError(
                f"--{flag} must be at least {low}{' and at most 65535' if flag == 'port' else ''}, "
                f"got {getattr(args, flag)}"
            )
    if not 0 < args.max_upload_mb <= 1024:
        raise ValueError(f"--max_upload_mb must be in (0, 1024], got {args.max_upload_mb}")
    if args.device is not None:
        try:
            torch.empty(0, device=args.device)
        except (RuntimeError, ValueError) as e:
            raise ValueError(
                f"--device {args.device!r} cannot be used here ({str(e).splitlines()[0]}); "
                "try --device cpu"
            ) from None


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the server as Ctrl-C does; the temporary folder goes


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        from lpd.app.load import load_app_model

        app = load_app_model(
            args.model, args.img_size, args.pretrained_ckpt, args.vqgan_path, args.device
        )
    except (ValueError, OSError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    workdir = tempfile.mkdtemp(prefix="lpd-app-")
    os.environ["GRADIO_TEMP_DIR"] = os.path.join(
        workdir, "gradio"
    )  # all the page serves lies in workdir
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        from lpd.app.ui import Studio, build_blocks  # imports gradio, which reads GRADIO_TEMP_DIR

        blocks = build_blocks(Studio(app, workdir), args.max_pixels)
        blocks.queue(max_size=args.queue_size, default_concurrency_limit=1)
        for attempt in range(
            5
        ):  # port 0: a free port, taken again if another process wins it first
            port = args.port or _free_port(args.host)
            try:
                blocks.launch(
                    server_name=args.host,
                    server_port=port,
                    share=args.share,
                    ssr_mode=False,
                    max_file_size=int(args.max_upload_mb * MB),
                    show_error=False,
                    footer_links=["api"],
                )
                return 0
            except OSError as e:
                if args.port or attempt == 4:
                    print(
                        f"error: --port {args.port}: cannot serve on {args.host}:{port} ({e}); "
                        "choose another "
                        f"port, or --port 0 for any free one",
                        file=sys.stderr,
                    )
                    return 2
    except KeyboardInterrupt:
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
