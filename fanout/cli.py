"""The `fanout` command: `fanout ingest`, `fanout edge`, `fanout dev`, `fanout token`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from common import __version__
from common.config import CONFIG_ENV, Loaded, add_arguments, describe, read_secret_file
from common.errors import ConfigError
from fanout.config import COMMANDS, load


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
    _add_command_arguments(ingest, "ingest")

    edge = sub.add_parser(
        "edge",
        help="run an edge node: serve WebSocket clients",
        description="Run an edge node: a Starlette app on uvicorn serving /ws (WebSocket), "
        "/ (demo page), /healthz, /readyz and /metrics.",
    )
    _add_command_arguments(edge, "edge")

    dev = sub.add_parser(
        "dev",
        help="run the whole system locally (embedded Valkey, simulated feed, ingest, 2 edges)",
        description="Run everything on this machine: an embedded Valkey (unless REDIS_URL is "
        "set), one ingest worker on the simulated feed and edge processes; prints the URLs. "
        "Ctrl-C stops everything.",
    )
    from fanout import dev as dev_module

    dev_module.add_arguments(dev)

    config = sub.add_parser(
        "config",
        help="check a configuration: fanout config check [FILE]",
        description="Configuration tools.",
    )
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = config_sub.add_parser(
        "check",
        help="validate the config file and environment, print the effective configuration",
        description="Validate a config file together with the environment (unknown "
        "variables and keys, every value, the cross-setting checks) as `fanout edge` and "
        "`fanout ingest` would at start, and print every setting, its value (secrets as "
        "***) and where it came from: default, file, env or flag. Exit status 2 if "
        "anything is wrong.",
    )
    check.add_argument("file", nargs="?", default=None, metavar="FILE",
                       help=f"the TOML config file (default: ${CONFIG_ENV}; none: the "
                       "environment alone)")
    check.add_argument("--command", dest="command_name", choices=sorted(COMMANDS),
                       default=None,
                       help="check for this command only (default: every one)")

    token = sub.add_parser(
        "token",
        help="print a signed connection token (for development and scripts)",
        description="Print a JWT for `connect`, signed with FANOUT_AUTH_SECRET (read from the "
        "environment only, or from the file FANOUT_AUTH_SECRET_FILE names, never a flag, so "
        "it stays out of shell history and ps), or with "
        "a private key file (RS/PS, ES, EdDSA) for an edge that verifies with the public key "
        "or a JWKS. Backends and identity providers mint their own tokens the same way "
        "(docs/protocol.md, Authentication).",
    )
    token.add_argument("--sub", required=True, help="who the client is (the sub claim)")
    token.add_argument("--ttl", type=float, default=3600.0,
                       help="seconds until it expires (default 3600)")
    token.add_argument("--channels", default=None,
                       help="comma-separated channel patterns (default: the edge's "
                       "FANOUT_AUTH_CHANNELS)")
    token.add_argument("--accounts", default="",
                       help="comma-separated account ids whose account.<id>.* it may read")
    token.add_argument("--issuer", default="", help="iss claim")
    token.add_argument("--audience", default="", help="aud claim")
    token.add_argument("--private-key-file", default=None,
                       help="PEM private key (RSA, EC P-256/384/521, Ed25519/Ed448, "
                       "unencrypted) to sign with instead of FANOUT_AUTH_SECRET")
    token.add_argument("--alg", default=None,
                       help="JWT algorithm (default: HS256 with the secret; RS256, the EC "
                       "curve's ES256/384/512, or EdDSA with a private key)")
    token.add_argument("--kid", default=None,
                       help="kid header: the id of the key in the edge's JWKS")
    return parser


def _token(args: argparse.Namespace) -> int:
    import os
    import time

    from common.auth import PrivateKey, check_patterns, key_algorithms, load_private_key, sign_token

    key: bytes | PrivateKey
    if args.private_key_file:
        try:
            with open(args.private_key_file, "rb") as file:
                key = load_private_key(file.read(1024 * 1024))
        except OSError as exc:
            raise ConfigError("--private-key-file", f"cannot read: {exc.strerror}") from None
        except ValueError as exc:
            raise ConfigError("--private-key-file", str(exc)) from None
    else:
        secret = os.environ.get("FANOUT_AUTH_SECRET", "")
        if not secret and os.environ.get("FANOUT_AUTH_SECRET_FILE"):
            secret = read_secret_file("FANOUT_AUTH_SECRET_FILE",
                                      os.environ["FANOUT_AUTH_SECRET_FILE"])
        if not secret:
            raise ConfigError("FANOUT_AUTH_SECRET", "must be set in the environment, or "
                              "FANOUT_AUTH_SECRET_FILE (or sign with --private-key-file)")
        key = secret.encode()
    if args.alg is not None and args.alg not in key_algorithms(key):
        raise ConfigError("--alg", f"{args.alg!r} does not fit this key: it signs "
                          f"{', '.join(key_algorithms(key))}")
    if not args.ttl > 0:
        raise ConfigError("--ttl", "must be > 0")
    now = int(time.time())
    claims: dict[str, object] = {"sub": args.sub, "iat": now, "exp": now + round(args.ttl)}
    if args.channels is not None:
        try:
            claims["channels"] = list(check_patterns(c.strip() for c in
                                                     args.channels.split(",") if c.strip()))
        except ValueError as exc:
            raise ConfigError("--channels", str(exc)) from None
    accounts = [a.strip() for a in args.accounts.split(",") if a.strip()]
    if accounts:
        claims["accounts"] = accounts
    if args.issuer:
        claims["iss"] = args.issuer
    if args.audience:
        claims["aud"] = args.audience
    print(sign_token(claims, key, args.alg, args.kid))
    return 0


def _add_command_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--config", default=None, metavar="FILE",
                        help=f"TOML config file: sections [redis] and [{command}], keys "
                        "as in this list (file < environment < flags) "
                        f"[env {CONFIG_ENV}]")
    cmd = COMMANDS[command]
    add_arguments(parser, cmd.settings, cmd.cls, command)


def show(loaded: Loaded) -> str:
    """The effective configuration of one command, secrets as ***."""
    rows = describe(loaded)
    key_width = max(len(key) for key, _, _ in rows)
    value_width = max((len(value) for _, value, _ in rows if len(value) <= 40), default=0)
    where = f" (config file {loaded.file})" if loaded.file else " (no config file)"
    lines = [f"fanout {loaded.command.name}: configuration OK{where}"]
    for key, value, source in rows:
        lines.append(f"  {key:<{key_width}}  {value:<{value_width}}  {source}")
    return "\n".join(lines)


def _config_check(args: argparse.Namespace) -> int:
    commands = [args.command_name] if args.command_name else sorted(COMMANDS)
    for i, name in enumerate(commands):
        loaded = load(name, path=args.file)
        print(("\n" if i else "") + show(loaded))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "ingest":
            ingest_config = load("ingest", args=args).config
            _logging(ingest_config.log_level)
            from ingest.worker import run_worker

            return run_worker(ingest_config)
        if args.command == "edge":
            edge_config = load("edge", args=args).config
            _logging(edge_config.log_level)
            from edge.server import run_edge

            return run_edge(edge_config)
        if args.command == "token":
            return _token(args)
        if args.command == "config":
            return _config_check(args)
        from fanout import dev as dev_module

        return dev_module.run(args)
    except ConfigError as exc:
        name = "config check" if args.command == "config" else args.command
        print(f"fanout {name}: bad setting {exc}", file=sys.stderr)
        return 2


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )

