"""Submit any entry point (main_train.py, main_cache.py, main_eval.py) to Slurm through submitit.

    python scripts/slurm.py --nodes 4 --gpus_per_node 8 --partition learn --account my_acct \\
        --time 4320 --job_dir outputs/slurm/lpd_l_256 -- \\
        main_train.py --config configs/train_lpd_l_256.yaml --cached_path CACHE --output_dir outputs/lpd_l_256
    python scripts/slurm.py --dry_run ... -- main_train.py ...      # print the sbatch script, submit nothing
    python scripts/slurm.py --cluster local --gpus_per_node 0 --tasks_per_node 2 -- main_train.py ...  # no Slurm

One Slurm task per GPU (``--tasks_per_node``, default ``--gpus_per_node``); each exports the torch.distributed
environment (``MASTER_ADDR``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ...) and runs ``python ENTRY ARGS``. For
``main_train.py`` with an ``OUTPUT_DIR/checkpoint-last.pth`` (or ``checkpoint-last/``), ``--resume OUTPUT_DIR`` is
added, so every (re)started job continues where the last one stopped.

Before a time limit Slurm sends ``USR2`` (``--signal_delay_s``; the training processes ignore it); rank 0's
launcher then sends ``SIGUSR1`` to training (which saves ``checkpoint-last.pth`` at the next step boundary and exits
with status 75), waits for it at most ``--grace_s`` seconds, and submitit requeues the job. Slurm's ``SIGTERM``
(preemption) makes training save and exit the same way.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import submitit

#: Exit status of main_train.py after saving on a preemption signal (lpd.train.PREEMPTED_EXIT_CODE).
PREEMPTED_EXIT_CODE = 75
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flag_value(args: Sequence[str], name: str) -> str | None:
    """Value of ``--name VALUE`` / ``--name=VALUE`` in an argument list (last one wins)."""
    value = None
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


def _ignore_usr2() -> None:  # runs in the child before exec: an ignored signal stays ignored
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class Launcher:
    """The submitted callable: set up torch.distributed from Slurm, run the entry point, requeue on preemption."""

    def __init__(
        self,
        entry: str,
        args: Sequence[str],
        grace_s: float = 300.0,
        python: str | None = None,
        cwd: str | None = None,
    ) -> None:
        self.entry, self.args, self.grace_s, self.python = (
            os.path.abspath(entry),
            list(args),
            grace_s,
            python or sys.executable,
        )
        self.cwd = cwd or os.getcwd()  # relative paths in args mean what they meant at submission
        self._proc: subprocess.Popen | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_proc": None}

    def command(self) -> list[str]:
        """``python ENTRY ARGS``, plus ``--resume OUTPUT_DIR`` for training when a checkpoint exists."""
        args = list(self.args)
        if (
            os.path.basename(self.entry) == "main_train.py"
            and _flag_value(args, "--resume") is None
        ):
            out = _flag_value(args, "--output_dir")
            last = os.path.join(self.cwd, out or "", "checkpoint-last")
            if out and (os.path.isfile(last + ".pth") or os.path.isdir(last)):
                args += ["--resume", out]
        return [self.python, self.entry, *args]

    def __call__(self) -> int:
        env_info = submitit.helpers.TorchDistributedEnvironment().export(
            set_cuda_visible_devices=False, overwrite=True
        )
        cmd = self.command()
        if env_info.rank == 0:
            print(
                f"[slurm.py] world size {env_info.world_size}, master {env_info.master_addr}:{env_info.master_port}; "
                f"running: {' '.join(cmd)}",
                flush=True,
            )
        self._proc = subprocess.Popen(
            cmd, cwd=self.cwd, env=dict(os.environ), preexec_fn=_ignore_usr2
        )
        rc = self._proc.wait()
        if rc == PREEMPTED_EXIT_CODE:
            print(
                f"[slurm.py] rank {env_info.rank}: {self.entry} saved and stopped on a preemption signal",
                flush=True,
            )
        elif rc != 0:
            raise RuntimeError(f"{self.entry} exited with status {rc} on rank {env_info.rank}")
        return rc

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on rank 0 before a timeout / preemption: save, then requeue with --resume."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            print(
                "[slurm.py] preemption: asking the training processes to save checkpoint-last.pth",
                flush=True,
            )
            proc.send_signal(signal.SIGUSR1)
            deadline = time.monotonic() + self.grace_s
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(1.0)
        return submitit.helpers.DelayedSubmission(
            Launcher(self.entry, self.args, self.grace_s, self.python, self.cwd)
        )


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "Submit an lpd entry point to Slurm",
        allow_abbrev=False,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus_per_node", type=int, default=8)
    p.add_argument(
        "--tasks_per_node", type=int, default=None, help="default: --gpus_per_node (at least 1)"
    )
    p.add_argument("--cpus_per_task", type=int, default=10)
    p.add_argument("--mem_gb", type=int, default=None, help="memory per node")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--constraint", default=None)
    p.add_argument("--comment", default=None)
    p.add_argument("--time", type=int, default=4320, help="time limit in minutes")
    p.add_argument("--job_name", default="lpd")
    p.add_argument(
        "--job_dir", default="outputs/slurm/%j", help="submitit logs and pickles (%%j: job id)"
    )
    p.add_argument(
        "--signal_delay_s", type=int, default=180, help="USR2 this long before the time limit"
    )
    p.add_argument(
        "--grace_s",
        type=float,
        default=150.0,
        help="wait this long for the checkpoint before requeueing",
    )
    p.add_argument(
        "--max_requeues",
        type=int,
        default=100,
        help="requeues after timeouts (preemptions are unlimited)",
    )
    p.add_argument(
        "--cluster",
        default="slurm",
        choices=["slurm", "local", "debug"],
        help="local / debug: run here without Slurm (tests, smoke runs)",
    )
    p.add_argument(
        "--dry_run",
        action="store_true",
        help="print the sbatch script and the command; submit nothing",
    )
    p.add_argument("entry", help="entry point, e.g. main_train.py")
    p.add_argument("entry_args", nargs=argparse.REMAINDER, help="its arguments")
    return p


def slurm_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The sbatch parameters of the job (submitit ``SlurmExecutor.update_parameters`` names)."""
    tasks = args.tasks_per_node if args.tasks_per_node is not None else max(1, args.gpus_per_node)
    params: dict[str, Any] = dict(
        job_name=args.job_name,
        nodes=args.nodes,
        ntasks_per_node=tasks,
        cpus_per_task=args.cpus_per_task,
        time=args.time,
        signal_delay_s=args.signal_delay_s,
    )
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if args.mem_gb:
        params["mem"] = f"{args.mem_gb}GB"
    for key in ("partition", "account", "qos", "constraint", "comment"):
        if getattr(args, key):
            params[key] = getattr(args, key)
    return params


def sbatch_script(args: argparse.Namespace) -> str:
    """The sbatch file submitit would write (built without Slurm; for --dry_run and tests)."""
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(
        command=f"{sys.executable} -u -m submitit.core._submit {args.job_dir}",
        folder=args.job_dir,
        **slurm_parameters(args),
    )


def make_executor(args: argparse.Namespace) -> submitit.Executor:
    """A submitit executor with the job's resources (Slurm, or local/debug for runs without Slurm)."""
    if args.cluster == "slurm":
        ex: submitit.Executor = submitit.SlurmExecutor(
            folder=args.job_dir, max_num_timeout=args.max_requeues
        )
        ex.update_parameters(**slurm_parameters(args))
        return ex
    if args.nodes != 1:
        raise SystemExit(f"--cluster {args.cluster} runs on this machine: --nodes must be 1")
    tasks = args.tasks_per_node if args.tasks_per_node is not None else max(1, args.gpus_per_node)
    ex = submitit.AutoExecutor(folder=args.job_dir, cluster=args.cluster)
    ex.update_parameters(
        timeout_min=args.time,
        tasks_per_node=tasks,
        gpus_per_node=args.gpus_per_node,
        name=args.job_name,
    )
    return ex


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    entry_args = list(args.entry_args)
    if entry_args[:1] == ["--"]:
        entry_args = entry_args[1:]
    if args.entry == "--" and entry_args:  # "slurm.py [options] -- ENTRY ARGS"
        args.entry, entry_args = entry_args[0], entry_args[1:]
    entry = args.entry
    if not os.path.isfile(entry) and os.path.isfile(os.path.join(REPO_ROOT, entry)):
        entry = os.path.join(REPO_ROOT, entry)  # "main_train.py" from any folder
    if not os.path.isfile(entry):
        raise SystemExit(f"entry point {args.entry!r} not found")
    launcher = Launcher(entry, entry_args, grace_s=args.grace_s)
    if args.dry_run:
        if args.cluster == "slurm":
            print(sbatch_script(args))
        print("command per task:", " ".join(launcher.command()))
        return 0
    job = make_executor(args).submit(launcher)
    print(f"submitted job {job.job_id}; logs in {args.job_dir.replace('%j', str(job.job_id))}")
    if args.cluster != "slurm":
        print(f"finished: exit status per task {job.results()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
