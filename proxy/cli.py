"""The `metergate` command: `serve` runs the service, `ratecard` checks and quotes cards."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.config import Config


def _listen(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for every address `host` resolves to, as aiohttp would open them.

    Bound here, before the app starts, so that a busy or forbidden address is
    one clear error and nothing (store, reaper, watchers) has been started for it.
    """
    sockets: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, type_, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, type_, proto)
            sockets.append(sock)
            if os.name == "posix":  # as asyncio: on Windows it would let another process share the port
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # One socket per family, as asyncio does: "::" must not also claim IPv4.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(128)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host or '*'}:{port}"


def _check_startup(config: Config) -> int | None:
    """Say what `proxy/startup.py` finds; an exit code when the service must not start, else None.

    Runs once the port is bound, so that a busy port stays the only line it prints.
    """
    from proxy import startup

    found = startup.check(config)
    for warning in found.warnings:
        print(f"metergate: warning: {warning}", file=sys.stderr)
    if found.error is not None:
        print(f"metergate: {found.error}", file=sys.stderr)
        return 1
    return None


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
    try:
        sockets = _listen(config.host, config.port)
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        print(f"metergate: cannot listen on {_address(config.host, config.port)}: {reason}", file=sys.stderr)
        return 1
    if (code := _check_startup(config)) is not None:
        for sock in sockets:
            sock.close()
        return code
    from proxy.gc_tuning import tune_after_startup
    from proxy.observability import configure_logging

    configure_logging(config)  # text, or JSON lines with `log_format: json`
    # handler_cancellation: a client that disconnects cancels its handler at once,
    # so the upstream is closed and the call settled for what it consumed.
    # On SIGTERM (or SIGINT) aiohttp stops listening, runs the app's on_shutdown
    # (which starts draining), lets handlers in flight run for shutdown_timeout,
    # cancels the rest (their leases settle what they relayed), then closes the
    # app: pending closes finish before the store does.
    app = create_app(config)
    app.on_startup.append(tune_after_startup)  # last: it freezes what the app's startup built
    web.run_app(app, sock=sockets, access_log=None, handler_cancellation=True,
                shutdown_timeout=config.shutdown_grace_seconds)
    return 0


def _version() -> str:
    try:
        return metadata.version("metergate")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ratecard"]:
        from pricing.cli import main as ratecard_main

        return ratecard_main(argv[1:])
    parser = argparse.ArgumentParser(prog="metergate")
    parser.add_argument("--version", action="version", version=f"metergate {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", help="path to metergate.yaml (default: the bundled config/metergate.yaml)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.set_defaults(run=_serve)
    commands.add_parser("ratecard", help="check, quote and diff rate cards (see `metergate ratecard --help`)")
    args = parser.parse_args(argv)
    return args.run(args)
