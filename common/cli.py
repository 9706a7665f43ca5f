"""The `fanout` command: `fanout ingest`, `fanout edge`, `fanout dev`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from common import __version__
from common.config import (
    EDGE_SETTINGS,
    INGEST_SETTINGS,
    EdgeConfig,
    IngestConfig,
    add_arguments,
    build,
    check_ingest,
)
from common.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fanout",
        description="Real-time market-data fan-out: ingest -> Redis streams -> edge -> browsers.",
    )
    parser.add_argument("--version", action="version", version=f"fanout {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ingest = sub.add_parser(
        "ingest",
        help="run an ingest worker: hold the upstream feed, publish sequenced messages",
        description="Run an ingest worker: read the upstream feed and publish every message "
        "through the atomic publish script (offset, history, snapshot, live notify). Workers "
        "of one feed elect a leader through a lease in Redis: only the leader connects "
        "upstream and publishes; the others stand by and take over within the lease TTL.",
    )
    add_arguments(ingest, INGEST_SETTINGS)

    edge = sub.add_parser(
        "edge",
        help="run an edge node: serve WebSocket clients",
        description="Run an edge node: a Starlette app on uvicorn serving /ws (WebSocket), "
        "/ (demo page), /healthz, /readyz and /metrics.",
    )
    add_arguments(edge, EDGE_SETTINGS)

    dev = sub.add_parser(
        "dev",
        help="run the whole system locally (embedded Valkey, simulated feed, ingest, 2 edges)",
        description="Run everything on this machine: an embedded Valkey (unless REDIS_URL is "
        "set), one ingest worker on the simulated feed and edge processes; prints the URLs. "
        "Ctrl-C stops everything.",
    )
    from common import dev as dev_module

    dev_module.add_arguments(dev)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "ingest":
            ingest_config = build(IngestConfig, INGEST_SETTINGS, args=args)
            check_ingest(ingest_config)
            _logging(ingest_config.log_level)
            from ingest.worker import run_worker

            return run_worker(ingest_config)
        if args.command == "edge":
            edge_config = build(EdgeConfig, EDGE_SETTINGS, args=args)
            _logging(edge_config.log_level)
            from edge.server import run_edge

            return run_edge(edge_config)
        from common import dev as dev_module

        return dev_module.run(args)
    except ConfigError as exc:
        print(f"fanout {args.command}: bad setting {exc}", file=sys.stderr)
        return 2


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


if __name__ == "__main__":
    sys.exit(main())
