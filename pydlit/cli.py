"""`pydlit` / `python -m pydlit`: parse flags over the environment, set up logging, serve."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from aiohttp import web

from .app import create_app
from .settings import Settings, from_env


def parse_args(argv: list[str] | None = None) -> Settings:
    env = from_env()
    parser = argparse.ArgumentParser(prog="pydlit", description="Distribute a container image from one registry to many.")
    parser.add_argument("--host", default=env.host, help="address to listen on (PYDLIT_HOST, default %(default)s)")
    parser.add_argument("--port", type=int, default=env.port, help="port to listen on (PYDLIT_PORT, default %(default)s)")
    parser.add_argument("--db", default=env.db, help="SQLite job database (PYDLIT_DB, default %(default)s)")
    parser.add_argument("--concurrency", type=int, default=env.concurrency, help="jobs run at once (PYDLIT_CONCURRENCY, default %(default)s)")
    args = parser.parse_args(argv)
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    return dataclasses.replace(env, host=args.host, port=args.port, db=args.db, concurrency=args.concurrency)


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr, level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # aiohttp's access log lines would carry query strings; the job events say what matters.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger(__name__).info("pydlit listening on %s:%d, jobs in %s", settings.host, settings.port, settings.db)
    web.run_app(create_app(settings), host=settings.host, port=settings.port, shutdown_timeout=5, print=None)


if __name__ == "__main__":
    main()
