"""Credentials follow each SDK's conventions (issue 13, item 7), against the emulators.

A URL with no site entry (``az://account/container/prefix``, ``s3://``, ``gs://``), or a
site that gives no credential option, takes its credentials and endpoint from the
environment variables, profiles and files the SDK and its CLI use. Each test registers a
tree uploaded to the emulator and checks the version id against the same tree scanned on
disk (the bytes hashed twice, by two paths). Secrets never show in errors.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from datasync.backends.s3 import S3Backend
from datasync.bootstrap import App, bootstrap
from datasync.config import SiteConfig
from datasync.errors import PermissionDenied
from tests.fixtures.emulators import (
    AZURITE_ACCOUNT,
    AZURITE_KEY,
    AzuriteInfo,
    _bad_gcs_credentials,
    make_azure_backend,
    make_gcs_backend,
    make_s3_backend,
)
from tests.fixtures.replication import Site, make_tree, settings_for, upload_tree

pytestmark = pytest.mark.emulator

# Variables of the three SDKs that must not leak in from the machine or another test.
_CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_ACCOUNT",
    "AZURE_STORAGE_ACCOUNT_NAME",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "STORAGE_EMULATOR_HOST",
)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in _CREDENTIAL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    # No ~/.aws of the machine: an empty config and credentials file.
    for name, var in (
        ("config", "AWS_CONFIG_FILE"),
        ("credentials", "AWS_SHARED_CREDENTIALS_FILE"),
    ):
        (tmp_path / f"aws-{name}").write_text("")
        monkeypatch.setenv(var, str(tmp_path / f"aws-{name}"))
    return monkeypatch


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, bytes]:
    return make_tree(tmp_path / "tree", seed=5)


def _app(tmp_path: Path, sites: list[Site] | None = None) -> App:
    return bootstrap(
        settings_for(tmp_path / "home", f"sqlite:///{tmp_path / 'ds.db'}", sites or [])
    )


def _same_as_local(app: App, tmp_path: Path, source: str) -> None:
    local = app.service.register_directory("drive/local", tmp_path / "tree")
    remote = app.service.register("drive/remote", source)
    assert remote.version_id == local.version_id and remote.files == local.files


# -- Azure --------------------------------------------------------------------------------


def test_an_az_url_without_a_site_uses_the_connection_string_variable(
    request: pytest.FixtureRequest,
    clean_env: pytest.MonkeyPatch,
    tmp_path: Path,
    tree: dict[str, bytes],
    azurite: AzuriteInfo,
) -> None:
    bucket = make_azure_backend(request)
    upload_tree(bucket, "drop/", tree)
    clean_env.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string())
    with _app(tmp_path) as app:
        _same_as_local(app, tmp_path, f"az://{AZURITE_ACCOUNT}/{bucket.container}/drop")


def _azure_site(azurite: AzuriteInfo, container: str) -> Site:
    """A site naming its endpoint and no credential: the environment must give one."""
    config = SiteConfig(
        url=f"az://{AZURITE_ACCOUNT}/{container}", options={"account_url": azurite.endpoint}
    )
    return Site("blob", config, "azure")


def _container_sas(container: str) -> str:
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    return str(
        generate_container_sas(
            AZURITE_ACCOUNT,
            container,
            account_key=AZURITE_KEY,
            permission=ContainerSasPermissions(read=True, list=True),
            expiry=datetime.now(UTC) + timedelta(hours=1),
        )
    )


@pytest.mark.parametrize("variable", ["AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_TOKEN"])
def test_an_azure_site_without_credentials_uses_the_key_or_sas_variable(
    request: pytest.FixtureRequest,
    clean_env: pytest.MonkeyPatch,
    tmp_path: Path,
    tree: dict[str, bytes],
    azurite: AzuriteInfo,
    variable: str,
) -> None:
    bucket = make_azure_backend(request)
    upload_tree(bucket, "drop/", tree)
    key = variable.endswith("KEY")
    clean_env.setenv(variable, AZURITE_KEY if key else _container_sas(bucket.container))
    with _app(tmp_path, [_azure_site(azurite, bucket.container)]) as app:
        _same_as_local(app, tmp_path, "blob:drop")
    if not key:
        return
    wrong = "d3Jvbmd3cm9uZ3dyb25nd3Jvbmd3cm9uZ3dyb25nd3Jvbmd3cm9uZ3dyb25nd3Jvbmc="
    clean_env.setenv(variable, wrong)
    with _app(tmp_path / "again", [_azure_site(azurite, bucket.container)]) as app:
        with pytest.raises(PermissionDenied) as caught:
            app.service.register("drive/remote", "blob:drop")
        assert wrong not in str(caught.value) and AZURITE_KEY not in str(caught.value)
        (info,) = app.replication.sites(timeout=10)
        assert info.healthy is False and wrong not in (info.error or "")


# -- S3 -----------------------------------------------------------------------------------


def test_an_s3_url_without_a_site_uses_the_endpoint_and_key_variables(
    request: pytest.FixtureRequest,
    clean_env: pytest.MonkeyPatch,
    tmp_path: Path,
    tree: dict[str, bytes],
    moto_server: str,
) -> None:
    bucket = make_s3_backend(request)
    upload_tree(bucket, "drop/", tree)
    clean_env.setenv("AWS_ENDPOINT_URL_S3", moto_server)
    clean_env.setenv("AWS_ACCESS_KEY_ID", "testing")
    clean_env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    clean_env.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with _app(tmp_path) as app:
        _same_as_local(app, tmp_path, f"s3://{bucket.bucket}/drop")


def _moto_checking_after(calls: int) -> Iterator[str]:
    """A moto server that checks signatures after its first ``calls`` requests. Its
    readiness is a TCP connect: an HTTP probe would count as a request."""
    binary = Path(sys.executable).parent / "moto_server"
    if not binary.exists():
        pytest.skip("moto_server not found: pip install 'moto[server]' (make install)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(calls)}
    server = subprocess.Popen(
        [str(binary), "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(30)


@pytest.fixture(scope="module")
def moto_iam() -> Iterator[dict[str, str]]:
    """A moto server that checks signatures after its first 4 calls, which make a user
    allowed everything, its key, and a bucket: the key works, any other is refused."""
    import boto3

    for endpoint in _moto_checking_after(4):
        unchecked: dict[str, Any] = {
            "endpoint_url": endpoint,
            "region_name": "us-east-1",
            "aws_access_key_id": "x",
            "aws_secret_access_key": "x",
        }
        iam = boto3.client("iam", **unchecked)
        iam.create_user(UserName="datasync")
        allow = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
        }
        iam.put_user_policy(UserName="datasync", PolicyName="all", PolicyDocument=json.dumps(allow))
        key = iam.create_access_key(UserName="datasync")["AccessKey"]
        boto3.client("s3", **unchecked).create_bucket(Bucket="profiles")
        yield {"endpoint": endpoint, "id": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
        iam.close()


def test_an_s3_site_without_keys_uses_the_profile_of_aws_profile(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, tree: dict[str, bytes], moto_iam: dict[str, str]
) -> None:
    owner = S3Backend(
        "profiles",
        "",
        endpoint_url=moto_iam["endpoint"],
        region_name="us-east-1",
        aws_access_key_id=moto_iam["id"],
        aws_secret_access_key=moto_iam["secret"],
    )
    upload_tree(owner, "drop/", tree)
    owner.close()
    credentials = tmp_path / "credentials"
    credentials.write_text(
        f"[good]\naws_access_key_id = {moto_iam['id']}\n"
        f"aws_secret_access_key = {moto_iam['secret']}\n"
        "[stale]\naws_access_key_id = AKIASTALESTALESTALE1\naws_secret_access_key = S3CRETstale\n"
    )
    clean_env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    site = Site(
        "aws",
        SiteConfig(
            url="s3://profiles",
            options={"endpoint_url": moto_iam["endpoint"], "region_name": "us-east-1"},
        ),
        "s3",
    )
    clean_env.setenv("AWS_PROFILE", "good")
    with _app(tmp_path, [site]) as app:
        _same_as_local(app, tmp_path, "aws:drop")
    for profile, why in (("stale", "InvalidAccessKeyId"), ("nobody", "ProfileNotFound")):
        clean_env.setenv("AWS_PROFILE", profile)
        with _app(tmp_path / profile, [site]) as app:
            with pytest.raises(PermissionDenied) as caught:
                app.service.register("drive/remote", "aws:drop")
            text = str(caught.value)
            assert why in text and "S3CRET" not in text and moto_iam["secret"] not in text


# -- GCS ----------------------------------------------------------------------------------


def test_a_gs_url_without_a_site_uses_the_emulator_variable(
    request: pytest.FixtureRequest,
    clean_env: pytest.MonkeyPatch,
    tmp_path: Path,
    tree: dict[str, bytes],
    gcs_emulator: str,
) -> None:
    bucket = make_gcs_backend(request)
    upload_tree(bucket, "drop/", tree)
    clean_env.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    with _app(tmp_path) as app:
        _same_as_local(app, tmp_path, f"gs://{bucket.bucket_name}/drop")


def test_a_gcs_site_without_a_credentials_file_uses_google_application_credentials(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, gcs_emulator: str
) -> None:
    """The emulator accepts any token, but its token endpoint refuses the service account
    the file names: a refusal proves the file was read (and its key is never shown)."""
    account = _bad_gcs_credentials(tmp_path, gcs_emulator)
    site = Site(
        "gcs",
        SiteConfig(url="gs://nowhere", options={"endpoint": gcs_emulator, "anonymous": False}),
        "gcs",
    )
    clean_env.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(account))
    with _app(tmp_path, [site]) as app:
        (info,) = app.replication.sites(timeout=20)
        assert info.healthy is False
        assert "credentials rejected by the token endpoint" in (info.error or "")
        assert "PRIVATE KEY" not in (info.error or "")
    clean_env.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    with _app(tmp_path / "missing", [site]) as app:
        (info,) = app.replication.sites(timeout=20)
        assert "no Google credentials found" in (info.error or "")
