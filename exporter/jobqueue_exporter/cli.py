"""Command line: ``run``, ``check``, ``once``, ``demo`` and the operator commands (``jobs``,
``recover-stale``, ``retry``, ``purge``; see operate.py). User errors print a message, never a traceback."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Callable, Sequence

from . import __version__, operate
from .config import CANONICAL_STATES, ConfigError, load_config, parse_duration, parse_listen
from .exporter import poll_all_once, serve
from .http import HttpLimits
from .logs import setup_logging


def _duration_arg(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0, e.g. 10s")
    return seconds


def _cmd_check(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    for target in config.targets:
        source = target.preset_name if target.table is None else f"table {target.table.name}"
        print(f"target {target.name}: {source}, poll every {config.interval_for(target):g}s")
    print(f"{args.config}: OK ({len(config.targets)} target(s))")
    return 0


def _cmd_once(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    setup_logging(config.log_format, "error")
    text, failures = asyncio.run(poll_all_once(config))
    sys.stdout.write(text.decode())
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    return 1 if failures else 0


def _cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    setup_logging(config.log_format, config.log_level)
    if args.listen:
        try:
            parse_listen(args.listen)
        except ValueError as exc:
            raise ValueError(f"--listen: {exc}") from None
    web_config = None
    if args.web_config_file:
        from .webconfig import load_web_config

        web_config = load_web_config(args.web_config_file)
    limits = HttpLimits(
        header_timeout=args.web_header_timeout,
        idle_timeout=args.web_idle_timeout,
        max_connections=args.web_max_connections,
        max_concurrent_scrapes=args.web_max_concurrent_scrapes,
    )
    asyncio.run(serve(config, args.listen, web_config, limits))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    duration = args.duration
    if duration is not None and not 0 < duration < float("inf"):  # also rejects nan
        print(
            f"error: --duration {duration:g}: give a number of seconds above 0, e.g. 90",
            file=sys.stderr,
        )
        return 2
    try:
        from .demo import run_demo
    except ImportError as exc:
        print(
            f"error: the demo needs the 'demo' extra ({exc.name} is missing): "
            "pip install 'jobqueue-exporter[demo]'",
            file=sys.stderr,
        )
        return 2
    setup_logging("text", "warning")
    return asyncio.run(run_demo(args.listen, duration=duration))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jobqueue-exporter",
        description="Prometheus exporter for PostgreSQL-backed job queues.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="poll the configured targets and serve /metrics")
    run.add_argument("--config", required=True, help="YAML config file")
    run.add_argument("--listen", help="HOST:PORT to listen on (overrides 'listen' in the config)")
    defaults = HttpLimits()
    run.add_argument(
        "--web.config.file",
        dest="web_config_file",
        metavar="PATH",
        help="TLS and basic-auth configuration, in the Prometheus exporter-toolkit format",
    )
    run.add_argument(
        "--web.header-timeout",
        dest="web_header_timeout",
        type=_duration_arg,
        default=defaults.header_timeout,
        metavar="DURATION",
        help=f"close a connection whose request headers take longer (default {defaults.header_timeout:g}s)",
    )
    run.add_argument(
        "--web.idle-timeout",
        dest="web_idle_timeout",
        type=_duration_arg,
        default=defaults.idle_timeout,
        metavar="DURATION",
        help=f"close a kept-alive connection idle this long (default {defaults.idle_timeout:g}s)",
    )
    run.add_argument(
        "--web.max-connections",
        dest="web_max_connections",
        type=operate.positive_int,
        default=defaults.max_connections,
        metavar="N",
        help=f"open connections accepted at once (default {defaults.max_connections})",
    )
    run.add_argument(
        "--web.max-concurrent-scrapes",
        dest="web_max_concurrent_scrapes",
        type=operate.positive_int,
        default=defaults.max_concurrent_scrapes,
        metavar="N",
        help=f"/metrics responses written at once; more wait (default {defaults.max_concurrent_scrapes})",
    )
    run.set_defaults(func=_cmd_run)
    check = sub.add_parser("check", help="validate a config file without connecting to anything")
    check.add_argument("--config", required=True)
    check.set_defaults(func=_cmd_check)
    once = sub.add_parser("once", help="poll every target once and print the metrics to stdout")
    once.add_argument("--config", required=True)
    once.set_defaults(func=_cmd_once)
    demo = sub.add_parser(
        "demo", help="live demo on an embedded PostgreSQL with a simulated workload"
    )
    demo.add_argument(
        "--listen", default="127.0.0.1:17410", help="HOST:PORT (default 127.0.0.1:17410)"
    )
    demo.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="SECONDS",
        help="run for SECONDS once serving (a number, e.g. 90 or 2.5), then clean up and exit 0 "
        "(default: until Ctrl-C or SIGTERM)",
    )
    demo.set_defaults(func=_cmd_demo)
    _operator_parsers(sub)
    return p


def _operator_parsers(sub: argparse._SubParsersAction) -> None:
    """Manual commands on one target's jobs; the mutating ones are dry runs unless given --yes."""

    def command(
        name: str, summary: str, func: Callable[[argparse.Namespace], int], mutating: bool = True
    ) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=summary)
        cmd.add_argument("--config", required=True, help="YAML config file")
        cmd.add_argument("--target", required=True, help="name of the target to act on")
        cmd.add_argument("--json", action="store_true", help="machine-readable output")
        if mutating:
            cmd.add_argument("--yes", action="store_true", help="act (default: dry run)")
        cmd.set_defaults(func=func)
        return cmd

    def filters(cmd: argparse.ArgumentParser, limit_help: str) -> None:
        cmd.add_argument("--queue", help="only this queue")
        cmd.add_argument("--kind", help="only this job kind")
        cmd.add_argument("--limit", type=operate.positive_int, help=limit_help)

    jobs = command("jobs", "list jobs with state, staleness and a hint", operate.cmd_jobs, False)
    jobs.add_argument(
        "--state",
        action="append",
        choices=CANONICAL_STATES,
        help="canonical state, repeatable (default: every state but succeeded and cancelled)",
    )
    jobs.add_argument(
        "--stale",
        action="store_true",
        help="only stale running jobs (the ones jobqueue_stale_jobs counts)",
    )
    filters(jobs, "at most N jobs (default 50)")
    jobs.set_defaults(limit=50)
    recover = command(
        "recover-stale", "reset stale running jobs as the queue would", operate.cmd_recover_stale
    )
    filters(recover, "at most N jobs (default: recovery.max_jobs_per_run)")
    retry = command("retry", "put failed/dead jobs back to pending", operate.cmd_retry)
    retry.add_argument("job_id", nargs="?", metavar="JOB_ID", help="the job to retry")
    retry.add_argument("--all-failed", action="store_true", help="every retryable job (filtered)")
    filters(retry, f"with --all-failed: at most N jobs (default {operate.DEFAULT_RETRY_LIMIT})")
    retry.add_argument("--to", help="table mappings: the native waiting state to put jobs in")
    purge = command("purge", "delete old finished jobs in batches", operate.cmd_purge)
    purge.add_argument("--older-than", required=True, help="age of the finished jobs, e.g. 30d")
    purge.add_argument(
        "--include-failed", action="store_true", help="also failed/dead/cancelled jobs"
    )
    purge.add_argument(
        "--batch", type=operate.positive_int, default=1000, help="rows per transaction (1000)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    except ValueError as exc:  # e.g. a bad --listen
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
