"""Shared parts of the security tests: a fake PostgreSQL that asks for a cleartext password (the
witness of what a client would transmit), and test certificates made with `openssl`.

The fake server speaks just enough of the protocol
(https://www.postgresql.org/docs/15/protocol-flow.html#id-1.10.6.7.3): it declines SSL/GSS
encryption, reads the StartupMessage (which carries the user name), answers
AuthenticationCleartextPassword, reads the PasswordMessage, and fails the login with an
ErrorResponse that quotes the user name, as PostgreSQL does. Everything received is kept.

The fixtures `sec` (the reconciler on KMock with SETTINGS) and `fake` (a started FakePostgres) are
registered for every test module by conftest.py (pytest_plugins); a module that needs another `sec`
(with a database, other settings) defines its own, which takes precedence.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import pathlib
import struct
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import pytest

from marketplacedb_operator.settings import Settings

SSL_REQUEST = 80877103
GSS_REQUEST = 80877104


@dataclasses.dataclass
class FakePostgres:
    reply: bytes | None = None  # set: answer every connection with these bytes instead (not PostgreSQL)
    silent: bool = False  # accept connections and never answer (a black hole: the timeout class)
    received: bytearray = dataclasses.field(default_factory=bytearray)
    connections: int = 0
    port: int = 0
    _server: asyncio.Server | None = None

    async def start(self) -> FakePostgres:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _read(self, reader: asyncio.StreamReader, n: int) -> bytes:
        data = await reader.readexactly(n)
        self.received += data
        return data

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            if self.silent:
                await reader.read()  # until the client gives up
                return
            if self.reply is not None:
                writer.write(self.reply)
                await writer.drain()
                return
            user = await self._startup(reader, writer)
            writer.write(b"R" + struct.pack("!ii", 8, 3))  # AuthenticationCleartextPassword
            await writer.drain()
            kind = await self._read(reader, 1)
            (length,) = struct.unpack("!i", await self._read(reader, 4))
            await self._read(reader, length - 4)  # the password, if the client sends it
            if kind == b"p":
                fields = b"SFATAL\0C28P01\0Mpassword authentication failed for user \"" + user + b"\"\0\0"
                writer.write(b"E" + struct.pack("!i", len(fields) + 4) + fields)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _startup(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        while True:
            (length,) = struct.unpack("!i", await self._read(reader, 4))
            body = await self._read(reader, length - 4)
            (code,) = struct.unpack("!i", body[:4])
            if code in (SSL_REQUEST, GSS_REQUEST):
                writer.write(b"N")  # no encryption: the startup packet follows in cleartext
                await writer.drain()
                continue
            parts = body[4:].split(b"\0")
            params = dict(zip(parts[::2], parts[1::2], strict=False))
            return params.get(b"user", b"")


# -- certificates ---------------------------------------------------------------------------------


def _openssl(*args: str, cwd: pathlib.Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(directory: pathlib.Path, name: str) -> tuple[pathlib.Path, pathlib.Path]:
    """A self-signed CA: (certificate, key)."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
             "-keyout", str(key), "-out", str(cert), "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
    return cert, key


def issue(directory: pathlib.Path, ca: tuple[pathlib.Path, pathlib.Path], name: str, cn: str,
          san: str | None = None) -> tuple[pathlib.Path, pathlib.Path]:
    """A leaf certificate signed by `ca`: (certificate, key)."""
    cert, key, csr = directory / f"{name}.crt", directory / f"{name}.key", directory / f"{name}.csr"
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout", str(key), "-out", str(csr),
             cwd=directory)
    extra: list[str] = []
    if san:
        ext = directory / f"{name}.ext"
        ext.write_text(f"subjectAltName={san}\n")
        extra = ["-extfile", str(ext)]
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
             "-days", "2", "-out", str(cert), *extra, cwd=directory)
    key.chmod(0o600)
    return cert, key


def text(path: pathlib.Path) -> str:
    return path.read_text()


# -- the reconciler on KMock, called directly (deterministic: one reconcile per call) ---------------

NS = "prod"
API = "marketplacedb.io/v1alpha1"


@dataclasses.dataclass
class Sec:
    api: Any
    objects: Any
    deps: Any
    logs: list[str]
    events: list[str] = dataclasses.field(default_factory=list)

    async def reconcile(self, name: str = "shop") -> Any:
        from marketplacedb_operator.reconcile import reconcile

        body = self.objects.get(API, "MarketplaceDB", name, NS)
        outcome = await asyncio.to_thread(reconcile, body, self.deps)
        self.events += [f"{e.type} {e.reason} {e.message}" for e in outcome.events]
        return outcome

    def condition(self, type_: str, name: str = "shop") -> dict[str, Any]:
        resource = self.objects.get(API, "MarketplaceDB", name, NS) or {}
        for item in resource.get("status", {}).get("conditions", []):
            if item["type"] == type_:
                return dict(item)
        return {}

    def writes(self, fragment: str = "") -> list[str]:
        return [f"{r.method} {r.url.path}?{r.url.query_string}" for r in self.api
                if r.method in ("POST", "PUT", "PATCH", "DELETE") and fragment in str(r.url.path)]

    def reads(self, fragment: str) -> list[str]:
        return [str(r.url.path) for r in self.api if r.method == "GET" and fragment in str(r.url.path)]

    def everything(self) -> str:
        """Every stored object but Secrets, the reconcile's Events and the captured logs, as text."""
        stored = [o.raw for o in self.api.objects.values() if not o.deleted and o.raw.get("kind") != "Secret"]
        return json.dumps(stored, default=str) + "\n".join(self.events) + "\n".join(self.logs)


class Capture(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(self.format(record))


@contextlib.asynccontextmanager
async def sec_env(kube_api: Any, kube_objects: Any, kube_client: Any, settings: Any) -> AsyncIterator[Sec]:
    from marketplacedb_operator.cli.wiring import make_deps

    await kube_objects.ensure_namespace(NS)
    logs: list[str] = []
    handler = Capture(logs)
    root = logging.getLogger("marketplacedb_operator")  # the operator's own log lines
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield Sec(kube_api, kube_objects, make_deps(settings, kube_client), logs)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def secret(name: str, data: dict[str, str], *, opted_in: bool, bound: str = "shop",
           annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """A Secret; opted in: labelled and bound (annotation credentials-for) to the MarketplaceDBs `bound`."""
    labels = {"marketplacedb.io/credentials": "true"} if opted_in else {"app": "other-team"}
    notes = ({"marketplacedb.io/credentials-for": bound} if opted_in else {}) | (annotations or {})
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "namespace": NS, "labels": labels, "annotations": notes},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


def resource(database: dict[str, Any], name: str = "shop", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "MarketplaceDB", "metadata": {"name": name, "namespace": NS},
            "spec": {"database": database, **spec}}


# --- fixtures shared by the security test modules -------------------------------------------------

SETTINGS = Settings(connect_timeout_seconds=3, resync_seconds=1)


@pytest.fixture
async def sec(kube_api: Any, kube_objects: Any, kube_client: Any) -> AsyncIterator[Sec]:
    async with sec_env(kube_api, kube_objects, kube_client, SETTINGS) as env:
        yield env


@pytest.fixture
async def fake() -> AsyncIterator[FakePostgres]:
    server = await FakePostgres().start()
    try:
        yield server
    finally:
        await server.stop()
