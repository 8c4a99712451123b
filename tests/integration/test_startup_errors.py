"""Start-up errors of the real `starling-coordinator` and `starling-signal` processes.

Every configuration, TLS, port, state-directory, database or Vault problem stops the process before it writes
anything, with exit code 2 and exactly one line on stderr naming the problem (coordinator.preflight).
All cases run as concurrent subprocesses in one module fixture (each in its own directory, on its own port);
the tests then check one case each. Nothing listens on `dead_port`; `busy_port` is held by this test.
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.pki import self_signed

pytestmark = pytest.mark.slow  # ~30 CLI processes: about 5 s on 2 idle cores

SIGNAL_KEY = base64.b64encode(bytes(32)).decode()


@dataclass
class Ctx:
    """What a case's config may refer to: its directory, its own free port, a free port nobody listens on,
    and a port that a socket of this test is listening on."""

    dir: Path
    port: int
    dead_port: int
    busy_port: int


@dataclass(frozen=True)
class Case:
    cli: str  # "coordinator" or "signal"
    config: Callable[[Ctx], dict[str, Any] | bytes]
    expected: Callable[[Ctx], list[str]]
    command: str = "serve"
    setup: Callable[[Ctx], None] | None = None


def _file(ctx: Ctx) -> None:
    (ctx.dir / "afile").write_text("not a directory\n")


def _db_dir(ctx: Ctx) -> None:
    (ctx.dir / "db").mkdir()


def _not_sqlite(ctx: Ctx) -> None:
    (ctx.dir / "db").write_text("hello, not a database\n")


def _tls(ctx: Ctx) -> None:
    self_signed(ctx.dir / "pki")
    self_signed(ctx.dir / "other")


def coord(ctx: Ctx, **extra: Any) -> dict[str, Any]:
    return {"listen": {"host": "127.0.0.1", "port": ctx.port}, "state_dir": str(ctx.dir / "state"), **extra}


def sig(ctx: Ctx, **extra: Any) -> dict[str, Any]:
    return {"listen": {"host": "127.0.0.1", "port": ctx.port}, "signing_public_key": SIGNAL_KEY, **extra}


def vault(port: int) -> dict[str, Any]:
    return {"source": "vault", "vault": {"url": f"http://127.0.0.1:{port}", "token": "s.never-shown"}}


def pg(port: int) -> dict[str, Any]:
    return {"url": f"postgresql://starling:pw-never-shown@127.0.0.1:{port}/starling"}


def _tls_pair(ctx: Ctx, cert: str = "pki/coordinator.crt", key: str = "pki/coordinator.key") -> dict[str, str]:
    return {"certfile": str(ctx.dir / cert), "keyfile": str(ctx.dir / key)}


CASES: dict[str, Case] = {
    # ----- coordinator serve
    "port-in-use": Case(
        "coordinator",
        lambda c: {**coord(c), "listen": {"host": "127.0.0.1", "port": c.busy_port}},
        lambda c: [f"listen 127.0.0.1:{c.busy_port}: address already in use"],
    ),
    "port-checked-before-state-dir-and-vault": Case(
        "coordinator",
        lambda c: {
            **coord(c, state_dir=str(c.dir / "afile" / "state"), secrets=vault(c.dead_port)),
            "listen": {"host": "127.0.0.1", "port": c.busy_port},
        },
        lambda c: ["address already in use"],
        setup=_file,
    ),
    "state-dir-under-a-file": Case(
        "coordinator",
        lambda c: coord(c, state_dir=str(c.dir / "afile" / "state")),
        lambda c: [f"state_dir {c.dir}/afile/state", f"{c.dir}/afile is not a directory"],
        setup=_file,
    ),
    "state-dir-is-a-file": Case(
        "coordinator",
        lambda c: coord(c, state_dir=str(c.dir / "afile")),
        lambda c: [f"state_dir {c.dir}/afile: not a directory"],
        setup=_file,
    ),
    "sqlite-under-a-file": Case(
        "coordinator",
        lambda c: coord(c, database={"url": f"sqlite:///{c.dir}/afile/coordinator.db"}),
        lambda c: [f"database {c.dir}/afile/coordinator.db", "not a directory"],
        setup=_file,
    ),
    "sqlite-path-is-a-directory": Case(
        "coordinator",
        lambda c: coord(c, database={"url": f"sqlite:///{c.dir}/db"}),
        lambda c: [f"database {c.dir}/db: not a regular file"],
        setup=_db_dir,
    ),
    "sqlite-file-is-not-sqlite": Case(
        "coordinator",
        lambda c: coord(c, database={"url": f"sqlite:///{c.dir}/db"}),
        lambda c: [f"database {c.dir}/db: not a SQLite database"],
        setup=_not_sqlite,
    ),
    "sqlite-in-memory": Case(
        "coordinator",
        lambda c: coord(c, database={"url": "sqlite:///:memory:"}),
        lambda c: ["in-memory SQLite is not supported"],
    ),
    "postgres-refused": Case(
        "coordinator",
        lambda c: coord(c, database=pg(c.dead_port)),
        lambda c: [f"database postgresql+psycopg://starling:***@127.0.0.1:{c.dead_port}/starling", "refused"],
    ),
    "mysql-url": Case(
        "coordinator",
        lambda c: coord(c, database={"url": "mysql://u:p@127.0.0.1/db"}),
        lambda c: ["database.url: unsupported database 'mysql'"],
    ),
    "garbage-url": Case(
        "coordinator",
        lambda c: coord(c, database={"url": "not a url at all"}),
        lambda c: ["database.url is not a database URL"],
    ),
    "vault-unreachable": Case(
        "coordinator",
        lambda c: coord(c, secrets=vault(c.dead_port)),
        lambda c: [f"vault at http://127.0.0.1:{c.dead_port}: unreachable"],
    ),
    "bad-signing-key": Case(  # the other secrets are missing: generated in memory only, never stored
        "coordinator",
        lambda c: coord(c, secrets={"source": "config", "signing_key": "not-base64!"}),
        lambda c: ["signing_key is not the base64 encoding", "from the config source"],
    ),
    "secret-not-a-string": Case(
        "coordinator",
        lambda c: coord(c, secrets={"source": "config", "admin_token": 5}),
        lambda c: ["secrets.admin_token must be a string"],
    ),
    "non-utf8-config": Case(
        "coordinator",
        lambda c: b"\xff\xfe listen:\n",
        lambda c: [f"config {c.dir}/config.yaml is not UTF-8 text", "0xff"],
    ),
    "yaml-syntax": Case(
        "coordinator",
        lambda c: b"listen: {port: 1\nstate_dir: [\n",
        lambda c: [f"config {c.dir}/config.yaml is not valid YAML", "line "],
    ),
    "unknown-key": Case(
        "coordinator",
        lambda c: coord(c, bogus=1),
        lambda c: ["invalid config at bogus"],
    ),
    "tls-missing": Case(
        "coordinator",
        lambda c: coord(c, tls=_tls_pair(c, cert="pki/nope.crt")),
        lambda c: [f"tls: {c.dir}/pki/nope.crt: no such file"],
        setup=_tls,
    ),
    "tls-mismatch": Case(
        "coordinator",
        lambda c: coord(c, tls=_tls_pair(c, cert="other/coordinator.crt")),
        lambda c: ["tls: cannot use certfile"],
        setup=_tls,
    ),
    # ----- the other coordinator commands
    "migrate-state-dir-under-a-file": Case(
        "coordinator",
        lambda c: coord(c, state_dir=str(c.dir / "afile" / "state")),
        lambda c: ["state_dir", "is not a directory"],
        command="migrate",
        setup=_file,
    ),
    "migrate-postgres-refused": Case(
        "coordinator",
        lambda c: coord(c, database=pg(c.dead_port)),
        lambda c: ["refused"],
        command="migrate",
    ),
    "show-admin-token-vault-unreachable": Case(
        "coordinator",
        lambda c: coord(c, secrets=vault(c.dead_port)),
        lambda c: ["vault at", "unreachable"],
        command="show-admin-token",
    ),
    # ----- signal serve
    "signal-port-in-use": Case(
        "signal",
        lambda c: {**sig(c), "listen": {"host": "127.0.0.1", "port": c.busy_port}},
        lambda c: [f"listen 127.0.0.1:{c.busy_port}: address already in use"],
    ),
    "signal-tls-missing": Case(
        "signal",
        lambda c: sig(c, tls=_tls_pair(c, key="pki/nope.key")),
        lambda c: [f"tls: {c.dir}/pki/nope.key: no such file"],
        setup=_tls,
    ),
    "signal-tls-mismatch": Case(
        "signal",
        lambda c: sig(c, tls=_tls_pair(c, cert="other/coordinator.crt")),
        lambda c: ["tls: cannot use certfile"],
        setup=_tls,
    ),
    "signal-coordinator-ca-missing": Case(
        "signal",
        lambda c: {**sig(c, coordinator_url="https://127.0.0.1:9", coordinator_ca=str(c.dir / "ca.pem"))},
        lambda c: [f"coordinator_ca {c.dir}/ca.pem: no such file"],
    ),
    "signal-non-utf8-config": Case(
        "signal",
        lambda c: b"\xff\xfe listen:\n",
        lambda c: ["is not UTF-8 text"],
    ),
    "signal-yaml-syntax": Case(
        "signal",
        lambda c: b"listen: [\n",
        lambda c: ["is not valid YAML"],
    ),
    "signal-unknown-key": Case(
        "signal",
        lambda c: sig(c, limits={"frame": 1}),
        lambda c: ["invalid config at limits.frame"],
    ),
    "signal-no-key-source": Case(
        "signal",
        lambda c: {"listen": {"port": c.port}},
        lambda c: ["set signing_public_key or coordinator_url"],
    ),
}


@dataclass
class Outcome:
    ctx: Ctx
    returncode: int
    stderr: str
    before: set[str]
    after: set[str]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that were free a moment ago (all bound at once, then released)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def _run(case: Case, ctx: Ctx) -> Outcome:
    if case.setup is not None:
        case.setup(ctx)
    config = case.config(ctx)
    path = ctx.dir / "config.yaml"
    path.write_bytes(config if isinstance(config, bytes) else yaml.safe_dump(config).encode())
    before = _tree(ctx.dir)
    module = "coordinator.cli" if case.cli == "coordinator" else "coordinator.signal.cli"
    result = subprocess.run(
        [sys.executable, "-m", module, "--config", str(path), case.command],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        cwd=ctx.dir,
        env={k: v for k, v in os.environ.items() if not k.startswith("STARLING_")},
    )
    return Outcome(ctx, result.returncode, result.stderr, before, _tree(ctx.dir))


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Outcome]]:
    root = tmp_path_factory.mktemp("startup")
    ports = _free_ports(2 * len(CASES) + 1)
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", ports.pop()))
        busy.listen()
        busy_port = int(busy.getsockname()[1])
        contexts = {}
        for name in CASES:
            (root / name).mkdir()
            contexts[name] = Ctx(root / name, ports.pop(), ports.pop(), busy_port)
        with ThreadPoolExecutor(max_workers=8) as pool:
            futures = {name: pool.submit(_run, case, contexts[name]) for name, case in CASES.items()}
            yield {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_start_up_error_is_one_line_exit_2_and_nothing_written(name: str, outcomes: dict[str, Outcome]) -> None:
    if "postgres" in name:
        pytest.importorskip("psycopg")  # the `postgres` extra
    case, out = CASES[name], outcomes[name]
    prog = "starling-coordinator" if case.cli == "coordinator" else "starling-signal"
    lines = out.stderr.splitlines()
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: ") and out.stderr.endswith("\n"), out.stderr
    for words in case.expected(out.ctx):
        assert words.lower() in lines[0].lower(), (words, lines[0])
    assert "never-shown" not in out.stderr
    assert out.after == out.before, f"written: {sorted(out.after - out.before)}"
    assert not (out.ctx.dir / "state").exists()
