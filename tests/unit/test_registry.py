"""URL → backend registry: schemes, lazy SDK imports, install hints, redaction."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from datasync.backends.memory import MemoryBackend, drop_store
from datasync.backends.posix import PosixBackend
from datasync.backends.registry import (
    _SCHEMES,
    backend_target,
    open_backend,
    parse_url,
    redact,
    redact_options,
    register_scheme,
)
from datasync.errors import ConfigError


def test_plain_and_file_paths_open_posix(tmp_path: Path) -> None:
    a = open_backend(str(tmp_path))
    b = open_backend(f"file://{tmp_path}")
    c = open_backend(f"posix://{tmp_path}")
    for backend in (a, b, c):
        assert isinstance(backend, PosixBackend)
        assert backend.url == str(tmp_path)


def test_file_urls_are_percent_decoded_but_paths_are_not(tmp_path: Path) -> None:
    assert parse_url("file:///data/a%20b").path == "/data/a b"
    assert parse_url("file://localhost/data/x").path == "/data/x"
    assert parse_url("/data/a%20b?x#y").path == "/data/a%20b?x#y"
    with pytest.raises(ConfigError, match="names a host"):
        parse_url("file://otherhost/data")


def test_relative_paths_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_url("./sub/dir").path == str(tmp_path / "sub" / "dir")
    assert parse_url("sub").path == str(tmp_path / "sub")


def test_site_references_are_not_resolved_here() -> None:
    with pytest.raises(ConfigError, match="SITE:path"):
        parse_url("gaggle:drive/tokyo")


def test_memory_urls_share_a_named_store() -> None:
    try:
        one = open_backend("memory://regtest/pre")
        two = open_backend("memory://regtest/pre", {"page_size": 2})
        assert isinstance(one, MemoryBackend) and isinstance(two, MemoryBackend)
        writer = one.begin("k", 1, 1)
        writer.put_part(0, b"x")
        writer.commit()
        assert two.read_range("k", 0, 1) == b"x"
        root = open_backend("memory://regtest")
        assert [i.key for i in root.list("")] == ["pre/k"]
    finally:
        drop_store("regtest")


def test_unknown_options_are_refused() -> None:
    with pytest.raises(ConfigError, match="pagesize"):
        open_backend("memory://x", {"pagesize": 5})


def test_cloud_schemes_map_to_their_modules() -> None:
    assert backend_target("s3://bucket/prefix") == "datasync.backends.s3:S3Backend"
    assert backend_target("az://acct/container/p") == "datasync.backends.azure:AzureBackend"
    assert backend_target("gs://bucket") == "datasync.backends.gcs:GCSBackend"
    assert backend_target("S3://bucket") == "datasync.backends.s3:S3Backend"
    parts = parse_url("s3://bucket/a%20b/c")
    assert (parts.scheme, parts.netloc, parts.path) == ("s3", "bucket", "/a%20b/c")


def test_unknown_scheme_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"known: az://, file://, gs://, memory://, s3://"):
        open_backend("ftp://host/x")


def test_opening_memory_or_posix_imports_no_cloud_sdk(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        from datasync.backends.registry import open_backend
        open_backend("memory://lazy")
        open_backend({str(tmp_path)!r})
        heavy = [m for m in ("boto3", "botocore", "azure", "google.cloud") if m in sys.modules]
        print(",".join(heavy))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""


@pytest.fixture
def fake_scheme(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A scheme whose backend module needs an SDK that is not installed."""
    (tmp_path / "ds_fake_backend.py").write_text(
        "import ds_sdk_that_does_not_exist  # noqa\n\nclass FakeBackend: ...\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(_SCHEMES, "fake", ("x:y", "x"))  # restored after the test
    register_scheme("fake", "ds_fake_backend:FakeBackend", "pip install ds-sdk")
    return "fake"


def test_missing_sdk_gives_an_install_hint_without_secrets(fake_scheme: str) -> None:
    with pytest.raises(ConfigError) as caught:
        open_backend("fake://user:hunter2@bucket/p?sig=abc123&sv=2024")
    message = str(caught.value)
    assert "ds_sdk_that_does_not_exist" in message and "pip install ds-sdk" in message
    assert "hunter2" not in message and "abc123" not in message
    assert isinstance(caught.value.__cause__, ImportError)


def test_missing_backend_module_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(_SCHEMES, "nope", ("datasync.backends.nope:Nope", "n/a"))
    with pytest.raises(ConfigError, match=r"no backend module datasync\.backends\.nope"):
        open_backend("nope://x")


def test_register_scheme_needs_module_and_class() -> None:
    with pytest.raises(ValueError):
        register_scheme("bad", "just_a_module", "hint")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("s3://bucket/prefix", "s3://bucket/prefix"),
        ("s3://AKIA:secret@bucket/p", "s3://AKIA:***@bucket/p"),
        ("s3://token@bucket/p", "s3://***@bucket/p"),
        (
            "az://acct/c/p?sv=2024-01-01&sig=abc%2Bdef&se=2026",
            "az://acct/c/p?sv=2024-01-01&sig=***&se=2026",
        ),
        (
            "https://h/o?X-Amz-Credential=AK&X-Amz-Signature=ff&X-Amz-Security-Token=t&a=1",
            "https://h/o?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Security-Token=***&a=1",
        ),
        ("/plain/path", "/plain/path"),
    ],
)
def test_redact(url: str, expected: str) -> None:
    assert redact(url) == expected


def test_redact_options() -> None:
    options = {
        "endpoint_url": "http://u:pw@127.0.0.1:9000",
        "aws_secret_access_key": "s3cr3t",
        "connection_string": "DefaultEndpointsProtocol=http;AccountKey=xyz",
        "account_key": "k",
        "sas_token": "sv=1&sig=2",
        "nested": {"password": "p", "region_name": "us-east-1"},
        "page_size": 100,
    }
    safe = redact_options(options)
    text = repr(safe)
    for secret in ("pw", "s3cr3t", "xyz", "sig=2", "'p'"):
        assert secret not in text
    assert safe["page_size"] == 100 and safe["nested"]["region_name"] == "us-east-1"
    assert safe["endpoint_url"] == "http://u:***@127.0.0.1:9000"


def test_has_backend_names_the_schemes_datasync_serves() -> None:
    from datasync.backends.registry import has_backend

    assert has_backend("/data") and has_backend("file:///data") and has_backend("posix:///d")
    assert has_backend("s3://b/p") and has_backend("az://a/c") and has_backend("gs://b")
    assert not has_backend("zip://::file:///x.zip") and not has_backend("https://h/p")
