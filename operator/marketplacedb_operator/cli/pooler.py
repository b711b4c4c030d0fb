"""`pooler-agent`: the PgBouncer sidecar (see pooler_agent.py)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from ..pooler_agent import AgentOptions, run


def register(commands: Any) -> None:
    agent = commands.add_parser(
        "pooler-agent",
        help="PgBouncer sidecar: RELOAD on config change (checked with SHOW CONFIG), health endpoints, drain",
    )
    agent.add_argument("--socket-dir", required=True, help="PgBouncer's unix_socket_dir (admin console)")
    agent.add_argument("--port", type=int, default=5432, help="PgBouncer's listen_port (names the socket)")
    agent.add_argument("--config", required=True, help="mounted pgbouncer.ini to watch")
    agent.add_argument("--auth-file", required=True, help="mounted auth file to watch")
    agent.add_argument("--database", required=True, help="database that must be served for readiness")
    agent.add_argument("--listen-port", type=int, default=8080, help="HTTP port for /livez /healthz /readyz /status")
    agent.add_argument("--listen-host", default="0.0.0.0", help="HTTP address of the read-only probes")
    agent.add_argument("--admin-port", type=int, default=8081, help="HTTP port for POST /drain and /reload")
    agent.add_argument("--admin-host", default="127.0.0.1", help="loopback address of the admin listener")
    agent.add_argument("--paused-file", default=None, help="file holding true/false: PAUSE or RESUME the database")
    agent.add_argument("--metrics-port", type=int, default=None, help="serve PgBouncer's metrics on this port")
    agent.add_argument("--watch", action="append", default=[], help="another file whose change means RELOAD "
                       "(the client TLS certificate and key)")
    agent.add_argument("--interval", type=float, default=2.0, help="seconds between file checks")
    agent.add_argument("--drain-delay", type=float, default=10.0, help="seconds unready before shutting down")
    agent.add_argument("--drain-timeout", type=float, default=40.0, help="seconds to wait for transactions")
    agent.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return run(AgentOptions(
        socket_dir=args.socket_dir, port=args.port, config=args.config, auth_file=args.auth_file,
        database=args.database, listen_port=args.listen_port, listen_host=args.listen_host,
        interval=args.interval, drain_delay=args.drain_delay, drain_timeout=args.drain_timeout,
        admin_port=args.admin_port, admin_host=args.admin_host, paused_file=args.paused_file,
        watch=tuple(args.watch), metrics_port=args.metrics_port,
    ))
