"""`pydlit` / `python -m pydlit`: the service (the default), and the client commands
(submit, status, jobs) and the serverless `copy`."""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import logging
import os
import signal
import socket
import sqlite3
import sys
from pathlib import Path

from aiohttp import web

from . import commands
from .app import create_app
from .credentials import CredentialsError
from .logs import setup_logging
from .nodelock import NodeBusy
from .secretbox import SecretError
from .settings import Settings, from_env
from .store import StoreError

CLIENT_COMMANDS = ("submit", "status", "jobs", "copy")
DEFAULT_SERVER = "http://127.0.0.1:5001"


def parse_args(argv: list[str] | None = None) -> Settings:
    env = from_env()
    parser = argparse.ArgumentParser(
        prog="pydlit",
        description="Distribute a container image from one registry to many. Without a command, run "
        "the service; `pydlit {submit,status,jobs,copy} --help` for the client commands.",
    )
    parser.add_argument("--host", default=env.host, help="address to listen on (PYDLIT_HOST, default %(default)s)")
    parser.add_argument("--port", type=int, default=env.port, help="port to listen on (PYDLIT_PORT, default %(default)s)")
    parser.add_argument("--db", default=env.db, help="SQLite job database (PYDLIT_DB, default %(default)s)")
    parser.add_argument("--concurrency", type=int, default=env.concurrency, help="jobs run at once; 0 queues jobs and runs none (PYDLIT_CONCURRENCY, default %(default)s)")
    args = parser.parse_args(argv)
    if args.concurrency < 0:
        parser.error("--concurrency must be 0 (queue jobs, run none) or more")
    if not 1 <= args.port <= 65535:
        parser.error("--port must be from 1 to 65535")
    return dataclasses.replace(env, host=args.host, port=args.port, db=args.db, concurrency=args.concurrency)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, not {text!r}")
    return value


def client_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pydlit")
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument("--server", default=os.environ.get("PYDLIT_URL") or DEFAULT_SERVER, help="the pydlit service (PYDLIT_URL, default %(default)s); PYDLIT_API_TOKEN is sent when set")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("submit", parents=[server], help="submit a request file (- for stdin)")
    p.add_argument("request_file")
    p.add_argument("--wait", action="store_true", help="follow the job with a progress bar until it ends")
    p.add_argument("--timeout", type=_positive, default=3600.0, help="with --wait: give up waiting after this many seconds (exit 3; the job goes on)")
    p = sub.add_parser("status", parents=[server], help="show one job")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true", help="print the raw status document")
    p = sub.add_parser("jobs", parents=[server], help="list jobs, newest first")
    p.add_argument("--state", type=str.upper, choices=["QUEUED", "RUNNING", "FINISHED", "FAILED"])
    p.add_argument("--limit", type=int, default=50)
    p = sub.add_parser("copy", help="copy one image without a server, e.g. localhost:5000/app:v1 localhost:5001/app")
    p.add_argument("source")
    p.add_argument("targets", nargs="+")
    p.add_argument("--overwrite", action="store_true", help="replace a target tag that holds another digest")
    p.add_argument("--verify-tls", action="store_true", help="verify registry certificates")
    p.add_argument("--referrers", action="store_true", help="also copy the image's signatures, SBOMs and attestations (OCI referrers, cosign digest tags)")
    return parser


def run_client(argv: list[str]) -> int:
    args = client_parser().parse_args(argv)
    token = os.environ.get("PYDLIT_API_TOKEN") or None
    if args.command == "submit":
        return commands.submit(args.server, args.request_file, args.wait, token, sys.stdout, timeout=args.timeout)
    if args.command == "status":
        return commands.status(args.server, args.job_id, token, sys.stdout, as_json=args.json)
    if args.command == "jobs":
        return commands.jobs(args.server, args.state, args.limit, token, sys.stdout)
    return asyncio.run(commands.copy(args.source, args.targets, overwrite=args.overwrite, verify_tls=args.verify_tls, referrers=args.referrers, out=sys.stdout))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in CLIENT_COMMANDS:
        raise SystemExit(run_client(argv))
    settings = parse_args(argv[1:] if argv and argv[0] == "serve" else argv)
    setup_logging(settings.log_level, settings.log_format)
    log = logging.getLogger(__name__)
    if not settings.api_token and not _loopback(settings.host):
        if settings.credentials:
            raise SystemExit(
                f"pydlit: on {settings.host} without PYDLIT_API_TOKEN, anyone who can reach port {settings.port} "
                "could copy images with the PYDLIT_CREDENTIALS registries' credentials: set PYDLIT_API_TOKEN, "
                "or listen on 127.0.0.1"
            )
        log.warning("listening on %s without PYDLIT_API_TOKEN: anyone who can reach port %d can run copies",
                    settings.host, settings.port)
    problem = _db_problem(Path(settings.db))
    if problem:
        raise SystemExit(f"pydlit: cannot use the job database {settings.db}: {problem}")
    # Bound before the start, which takes back this node's jobs: a port in use stops it first.
    try:
        sockets = _listen(settings.host, settings.port)
    except OSError as exc:
        raise SystemExit(f"pydlit: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}") from None
    app = create_app(settings)

    async def started(app: web.Application) -> None:
        log.info("pydlit listening on %s:%d, jobs in %s", settings.host, settings.port, settings.db)

    async def stopping(app: web.Application) -> None:
        # Another SIGTERM or SIGINT meanwhile (an impatient supervisor, a Ctrl-C after `docker
        # stop`) would end the stop at once: chunks cut mid-way, and the job DB closed under the
        # jobs' last writes. It is only noted; SIGKILL still ends the process.
        log.info("stopping: no new job is claimed")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, log.warning, "already stopping: the chunks on their way end first (at most %g s)",
                                    settings.stop_grace_s)

    app.on_startup.append(started)  # after the resources of cleanup_ctx are up
    app.on_shutdown.append(stopping)  # before cleanup_ctx stops the worker
    try:
        web.run_app(app, sock=sockets, shutdown_timeout=5, print=None)
    except sqlite3.Error as exc:
        raise SystemExit(f"pydlit: cannot use the job database {settings.db}: {exc}") from None
    except (NodeBusy, SecretError, CredentialsError, StoreError, OSError) as exc:
        raise SystemExit(f"pydlit: {exc}") from None


def _db_problem(db: Path) -> str | None:
    """What keeps the job database from being opened at all, said before anything starts."""
    if db.is_dir():
        return "it is a directory"
    if not db.parent.is_dir():
        return f"there is no directory {db.parent}"
    return None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _listen(host: str, port: int) -> list[socket.socket]:
    """A listening socket on every address the host name gives (localhost: ::1 and 127.0.0.1),
    as aiohttp's own host= would."""
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    addresses = dict.fromkeys((family, sockaddr[:2]) for family, _, _, _, sockaddr in found)
    sockets: list[socket.socket] = []
    try:
        for family, address in addresses:
            sockets.append(socket.create_server(address, family=family, backlog=128))
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


if __name__ == "__main__":
    main()
