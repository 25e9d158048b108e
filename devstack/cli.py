"""``python -m devstack``: up [--dagster] [--dagster-module M], down [--purge], status, env,
and ray start|stop|status for worker nodes next to the stack's Ray head."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from devstack import ray_nodes, stack
from devstack.dagster_local import DEFAULT_DAGSTER_MODULE
from devstack.layout import ENV_FILE
from devstack.ray_layout import MAX_WORKERS, WORKER_NUM_CPUS
from devstack.service import StackError, say


def ray_command(args: argparse.Namespace) -> int:
    """The stack's head alone (``start`` starts it if it is down), plus ``--workers`` nodes."""
    head = dataclasses.replace(ray_nodes.STACK_HEAD, worker_num_cpus=args.worker_num_cpus)
    if args.action == "stop":
        say(f"ray head {'stopped' if ray_nodes.stop(head) else 'was not running'}")
        return 0
    if args.action == "status":
        lines = ray_nodes.describe(head)
        for line in lines:
            say(line)
        return 0 if lines[0].endswith("ready") else 1
    try:
        pid = ray_nodes.start(head)
        ray_nodes.wait_until_ready(head, timeout=args.timeout)
        count = len(ray_nodes.running_workers(head)) if args.workers is None else args.workers
        workers = ray_nodes.scale_workers(head, count)
        ray_nodes.wait_for_nodes(head, 1 + count, timeout=args.timeout)
    except (StackError, ValueError) as exc:
        say(f"ERROR {exc}")
        return 1
    say(f"ray head ready: pid {pid}, {head.address}, dashboard {head.dashboard_url}; "
        f"{len(workers)} worker(s): " + (", ".join(f"{i}: pid {p}" for i, p in workers.items()) or "-"))
    return 0


def env_command(_: argparse.Namespace) -> int:
    say(str(ENV_FILE))
    if not ENV_FILE.exists():
        print("(missing: run `python -m devstack up` first)", file=sys.stderr)
        return 1
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m devstack",
                                  description="Local embedded service stack (127.0.0.1 only).")
    commands = top.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start every service (idempotent); writes .state/stack.env")
    up.add_argument("--dagster", action="store_true", help="also run dagster daemon+webserver")
    up.add_argument("--dagster-module",
                    help=f"code location module (default: $STACK_DAGSTER_MODULE or {DEFAULT_DAGSTER_MODULE})")
    up.set_defaults(run=lambda a: stack.up(with_dagster=a.dagster,
                                           module=a.dagster_module))
    down = commands.add_parser("down", help="stop every service, by PID")
    down.add_argument("--purge", action="store_true",
                      help="then remove all of the stack's state (data, logs, env file, Ray's temp dir)")
    down.set_defaults(run=lambda a: stack.down(purge=a.purge))
    status = commands.add_parser("status", help="one line per process; exit 1 unless all are ready")
    status.add_argument("--dagster", action="store_true", help="also check dagster")
    status.set_defaults(run=lambda a: stack.status(with_dagster=a.dagster))
    env = commands.add_parser("env", help="print the path of the env file to source")
    env.set_defaults(run=env_command)
    ray = commands.add_parser("ray", help="worker nodes next to the stack's Ray head")
    ray.add_argument("action", choices=["start", "stop", "status"],
                     help="start: the head if down, then --workers nodes; stop: workers, then the "
                     "head, by PID (never Ray's own `ray stop`)")
    ray.add_argument("--workers", type=int, default=None,
                     help=f"start: worker nodes to run, 0..{MAX_WORKERS} (default: keep the running "
                     "ones); extra workers are stopped, missing ones started")
    ray.add_argument("--worker-num-cpus", type=int, default=WORKER_NUM_CPUS,
                     help="CPUs each worker node offers to Ray (a logical count)")
    ray.add_argument("--timeout", type=float, default=90.0)
    ray.set_defaults(run=ray_command)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.run(args)
