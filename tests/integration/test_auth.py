"""API tokens: stored hashed, shown once, revocable, expiring; the embedded admin token;
``datasync token create|list|revoke``; HTTPS with ``--tls-cert``/``--tls-key``."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import ssl
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from datasync.auth import ADMIN_TOKEN_FILE, Role, TokenService, Unauthorized
from datasync.bootstrap import App, bootstrap
from datasync.cli import app as cli_app
from datasync.config import load_settings
from datasync.errors import UnknownReference, UserError
from tests.integration.api_helpers import free_port, served_admin_token, serving


@pytest.fixture
def env(tmp_path: Path, db_url: str) -> dict[str, str]:
    return {"DATASYNC_HOME": str(tmp_path / "home"), "DATASYNC_DATABASE_URL": db_url}


@pytest.fixture
def application(env: dict[str, str]) -> Iterator[App]:
    with bootstrap(load_settings(env=env)) as app:
        yield app


def _stored(app: App) -> list[dict[str, object]]:
    with app.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT * FROM api_tokens ORDER BY name")).mappings()
        return [dict(r) for r in rows]


def test_a_token_is_stored_as_its_sha256_only(application: App) -> None:
    issued = application.tokens.create("hook-1", Role.HOOK)
    assert len(issued.token) >= 43 and issued.token not in repr(issued)
    (row,) = _stored(application)
    assert row["token_hash"] == hashlib.sha256(issued.token.encode()).hexdigest()
    assert issued.token not in json.dumps(row, default=str)
    who = application.tokens.authenticate(issued.token)
    assert (who.name, who.role, who.namespaces) == ("hook-1", Role.HOOK, frozenset())
    two = application.tokens.create("hook-2", Role.HOOK)
    assert two.token != issued.token


def test_owner_tokens_need_namespaces_and_others_refuse_them(application: App) -> None:
    tokens = application.tokens
    owner = tokens.create("drive-owner", "owner", ["sim", "drive", "drive"])
    assert owner.namespaces == ["drive", "sim"]
    for args, message in [
        (("a", "owner", []), "needs at least one namespace"),
        (("b", "hook", ["drive"]), "owner tokens only"),
        (("c", "owner", ["Drive"]), "invalid namespace"),
        (("d", "root", []), "unknown role 'root'"),
        (("bad name", "ops", []), "invalid token name"),
        (("drive-owner", "owner", ["x"]), "exists already"),
    ]:
        with pytest.raises(UserError, match=message):
            tokens.create(*args)
    with pytest.raises(UserError, match="in the past"):
        tokens.create("e", Role.OPS, expires_at=dt.datetime(2000, 1, 1, tzinfo=dt.UTC))
    assert [t.name for t in tokens.list()] == ["drive-owner"]


def test_revoked_and_expired_tokens_authenticate_nobody(application: App) -> None:
    tokens = application.tokens
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1.5)
    brief = tokens.create("brief", Role.OPS, expires_at=soon)
    gone = tokens.create("gone", Role.ADMIN)
    assert tokens.authenticate(brief.token).name == "brief"
    first = tokens.revoke("gone")
    assert tokens.revoke("gone").revoked_at == first.revoked_at  # idempotent
    with pytest.raises(Unauthorized, match="'gone' was revoked"):
        tokens.authenticate(gone.token)
    time.sleep(max(0.0, (soon - dt.datetime.now(dt.UTC)).total_seconds()) + 0.1)
    with pytest.raises(Unauthorized, match="'brief' expired at"):
        tokens.authenticate(brief.token)
    states = {t.name: t.state for t in tokens.list()}
    assert states == {"brief": "expired", "gone": "revoked"}
    for bad in ("", "x", "y" * 10_000, gone.token + "x"):
        with pytest.raises(Unauthorized, match=r"^invalid token$"):
            tokens.authenticate(bad)
    with pytest.raises(UnknownReference):
        tokens.revoke("never-made")


def test_last_use_is_recorded_off_the_request_path(application: App) -> None:
    issued = application.tokens.create("used", Role.HOOK)
    assert application.tokens.list()[0].last_used_at is None
    application.tokens.authenticate(issued.token)
    application.tokens.close()  # waits for the background write
    assert application.tokens.list()[0].last_used_at is not None


def test_the_embedded_admin_token_is_made_once_with_mode_0600(application: App) -> None:
    home = application.settings.home
    path = application.tokens.ensure_admin(home)
    assert path == home / ADMIN_TOKEN_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text().strip()
    assert application.tokens.authenticate(token).role is Role.ADMIN
    assert application.tokens.ensure_admin(home) is None  # one exists: nothing new
    assert path.read_text().strip() == token
    assert [p.name for p in home.iterdir() if ".tmp" in p.name] == []
    # Revoked, it is replaced (under a new name: names stay unique).
    application.tokens.revoke("admin")
    assert application.tokens.ensure_admin(home) == path
    fresh = path.read_text().strip()
    assert fresh != token and application.tokens.authenticate(fresh).name.startswith("admin-")


def test_another_admin_token_means_no_embedded_one(application: App) -> None:
    application.tokens.create("ops-admin", Role.ADMIN)
    assert application.tokens.ensure_admin(application.settings.home) is None
    assert not (application.settings.home / ADMIN_TOKEN_FILE).exists()


def test_two_services_racing_for_the_admin_token_make_one(application: App) -> None:
    other = TokenService(application.engine)
    try:
        home = application.settings.home
        made = [application.tokens.ensure_admin(home), other.ensure_admin(home)]
    finally:
        other.close()
    assert made.count(None) == 1
    assert [t.name for t in application.tokens.list()] == ["admin"]


def _cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli_app, list(args), env=env)
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.stdout, result.stderr


def test_the_token_cli_creates_lists_and_revokes(env: dict[str, str], tmp_path: Path) -> None:
    code, out, err = _cli(env, "token", "create", "slurm", "--role", "hook")
    assert code == 0, err
    secret = out.strip()
    assert "shown this once" in err and secret not in err
    home = Path(env["DATASYNC_HOME"])
    assert "created an admin token in" in err and (home / ADMIN_TOKEN_FILE).exists()
    with bootstrap(load_settings(env=env)) as app:
        assert app.tokens.authenticate(secret).role is Role.HOOK

    out_file = tmp_path / "owner.token"
    code, out, err = _cli(
        env, "token", "create", "drive", "-r", "owner", "-n", "drive", "-o", str(out_file),
        "--expires", "+30d", "--json",
    )  # fmt: skip
    assert code == 0, err
    shown = json.loads(out)
    assert "token" not in shown and shown["file"] == str(out_file)
    assert shown["namespaces"] == ["drive"] and shown["expires_at"] is not None
    assert stat.S_IMODE(out_file.stat().st_mode) == 0o600
    code, out, err = _cli(env, "token", "list", "--json")
    listed = {t["name"]: t for t in json.loads(out)}
    assert set(listed) == {"admin", "drive", "slurm"} and "created an admin" not in err
    assert secret not in out and out_file.read_text().strip() not in out
    assert all("hash" not in key for t in listed.values() for key in t)
    code, out, _ = _cli(env, "token", "revoke", "slurm", "--json")
    assert code == 0 and json.loads(out)["state"] == "revoked"

    for args, message in [
        (("token", "revoke", "nobody"), "no token named 'nobody'"),
        (("token", "create", "slurm", "--role", "hook"), "exists already"),
        (("token", "create", "x", "--role", "owner"), "at least one namespace"),
        (("token", "create", "x", "--role", "ops", "--expires", "soon"), "bad deadline"),
        (
            ("token", "create", "x", "--role", "ops", "--expires", "+" + "9" * 20 + "d"),
            "before 9999",
        ),
    ]:
        code, out, err = _cli(env, *args)
        assert code == 2 and err.startswith("datasync: error: ") and message in err, err
    code, _, err = _cli(env, "token", "create", "x", "--role", "god")
    assert code == 2 and "'god' is not one of" in err


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made here (``cryptography``)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "datasync test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_serve_speaks_https_with_a_certificate(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    home = tmp_path / "home"
    env = {**os.environ, "DATASYNC_HOME": str(home), "DATASYNC_DATABASE_URL": ""}
    trust = ssl.create_default_context(cafile=str(cert))
    args = ("--tls-cert", str(cert), "--tls-key", str(key))
    with serving(env, *args, tls=trust) as server:
        assert server.base.startswith("https://")
        auth = {"Authorization": f"Bearer {served_admin_token(home)}"}
        me = httpx.get(f"{server.base}/api/v1/whoami", headers=auth, verify=trust, timeout=5)
        assert me.status_code == 200 and me.json()["role"] == "admin"
        with pytest.raises(httpx.ConnectError):  # not our CA: refused by the client
            httpx.get(f"{server.base}/api/v1/health", timeout=5)
        with pytest.raises(httpx.TransportError):  # plain HTTP on the TLS port
            httpx.get(server.base.replace("https", "http") + "/api/v1/health", timeout=5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tls-cert", "CERT"], "--tls-cert and --tls-key go together"),
        (["--tls-cert", "CERT", "--tls-key", "/no/key.pem"], "/no/key.pem: no such file"),
        (["--tls-cert", "KEY", "--tls-key", "KEY"], "cannot use --tls-cert"),
        (["--max-body", "12"], "at least 1KiB"),
        (["--max-upload", "lots"], "bad size 'lots'"),
    ],
)
def test_serve_refuses_bad_tls_and_limit_options(
    tmp_path: Path, args: list[str], message: str
) -> None:
    cert, key = _self_signed(tmp_path)
    args = [str(cert) if a == "CERT" else str(key) if a == "KEY" else a for a in args]
    env = {"DATASYNC_HOME": str(tmp_path / "home"), "DATASYNC_DATABASE_URL": ""}
    code, _, err = _cli(env, "serve", "--port", str(free_port()), *args)
    assert code == 2 and err.startswith("datasync: error: ") and message in err, err
    assert err.count("\n") == 1
