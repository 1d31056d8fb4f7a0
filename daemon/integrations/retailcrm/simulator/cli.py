"""``python -m daemon.integrations.retailcrm.simulator``: one simulated account, standalone.

::

    python -m daemon.integrations.retailcrm.simulator --port 8020 --api-key-file key.txt \\
        [--users 5] [--manager +375291112233=2 ...] [--no-rate-limit]

Serves until interrupted (Ctrl-C, SIGTERM). Valid API keys come from ``--api-key`` (kept
for tests and quick tries: a key on a command line shows in ``ps``) or, better, from
``--api-key-file`` (a path, or ``-`` for standard input; one key per line). A port already
in use is one line naming ``--port``, exit 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from aiohttp import web

from .account import Simulator
from .state import make_users

EXIT_FAILED = 1


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m daemon.integrations.retailcrm.simulator",
        description="Serve a simulated RetailCRM account (API v5) for demos, dry runs and "
        "benchmarks.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8020)
    parser.add_argument("--api-key", action="append", default=[], dest="api_keys",
                        help="a valid API key (repeat for several)")
    parser.add_argument("--api-key-file", metavar="PATH|-",
                        help="read valid API keys, one per line, from PATH or standard input")
    parser.add_argument("--users", type=int, default=3, help="how many managers to simulate")
    parser.add_argument("--manager", action="append", default=[], metavar="PHONE=USER_ID",
                        help="make USER_ID the responsible manager for PHONE (repeatable)")
    parser.add_argument("--no-rate-limit", action="store_true")
    args = parser.parse_args(argv)
    if args.api_key_file:
        args.api_keys += _read_keys(parser, args.api_key_file)
    if not args.api_keys:
        parser.error("give at least one valid key: --api-key-file PATH|- (or --api-key KEY)")
    for item in args.manager:
        phone, sep, user_id = item.partition("=")
        if not sep or not phone or not user_id.isdigit():
            parser.error(f"--manager {item!r}: expected PHONE=USER_ID")
    return args


def _read_keys(parser: argparse.ArgumentParser, source: str) -> list[str]:
    try:
        if source == "-":
            text = sys.stdin.read()
        else:
            with open(source, encoding="utf-8") as handle:
                text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        parser.error(f"--api-key-file: cannot read it ({type(exc).__name__})")
    return [line.strip() for line in text.splitlines() if line.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry: serve one simulated account until interrupted."""
    args = _parse_args(argv)
    managers = {}
    for item in args.manager:
        phone, _, user_id = item.partition("=")
        managers[phone] = int(user_id)
    sim = Simulator(
        api_keys=args.api_keys, users=make_users(args.users), managers=managers,
        rate_limit=not args.no_rate_limit,
    )
    try:
        web.run_app(
            sim.app(), host=args.host, port=args.port, access_log=None,
            print=lambda _: print(
                f"RetailCRM simulator on http://{args.host}:{args.port} "
                f"({args.users} users, {len(args.api_keys)} key(s))", flush=True,
            ),
        )
    except OSError as exc:
        print(f"retailcrm simulator: cannot listen on {args.host}:{args.port}: "
              f"{exc.strerror or exc} (choose another --port)", file=sys.stderr, flush=True)
        return EXIT_FAILED
    return 0
