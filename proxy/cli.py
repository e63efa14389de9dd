"""The `metergate` command: `serve` runs the service, `ratecard` checks and quotes cards."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from pricing.yaml_source import SourceError
    from proxy.app import create_app
    from proxy.config import load_config

    try:
        config = load_config(Path(args.config) if args.config else None, host=args.host, port=args.port)
    except SourceError as exc:
        print(f"metergate: bad configuration\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # handler_cancellation: a client that disconnects cancels its handler at once,
    # so the upstream is closed and the call settled for what it consumed.
    web.run_app(create_app(config), host=config.host, port=config.port, access_log=None, handler_cancellation=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ratecard"]:
        from pricing.cli import main as ratecard_main

        return ratecard_main(argv[1:])
    parser = argparse.ArgumentParser(prog="metergate")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", help="path to metergate.yaml (default: the bundled config/metergate.yaml)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.set_defaults(run=_serve)
    commands.add_parser("ratecard", help="check, quote and diff rate cards (see `metergate ratecard --help`)")
    args = parser.parse_args(argv)
    return args.run(args)
