"""Pure pieces of issue 13 (items 6-9): configuration mistakes as one line, references that
look like ids, deadlines no calendar holds, request-sized timeouts, where Azure credentials
come from, and the retry budget of a full file system. Real servers are in
``tests/integration/test_bad_input.py``, ``test_credentials.py``, ``test_site_health.py``
and ``test_full_disk.py``."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from datasync.backends.azure import credential_source
from datasync.backends.cloudcommon import Timeouts, host_port
from datasync.config import Settings, SiteConfig, check_database, load_settings
from datasync.errors import ConfigError, NoSpace, TransientError, UserError
from datasync.manifest.refs import check_label
from datasync.retry import Backoff, RetryPolicy
from datasync.transfer.status import parse_deadline

MiB = 1024 * 1024


def _load(tmp_path: Path, text: str) -> Settings:
    cfg = tmp_path / "datasync.toml"
    cfg.write_text(text)
    return load_settings({"DATASYNC_CONFIG": str(cfg), "DATASYNC_HOME": str(tmp_path / "h")})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[sites.x]\nurl = 'data/out'\n",
            "sites.x.url: 'data/out' is a relative path, which would depend on the current",
        ),
        ("[sites.x]\nurl = './out'\n", "sites.x.url: './out' is a relative path"),
        ("[sites.x]\nurl = 's4://bucket/p'\n", "sites.x.url: unknown storage URL scheme"),
        (
            "[sites.a]\nurl = '/data'\n[sites.b]\nurl = '/data/lustre'\n",
            "site 'b' has a root inside that of site 'a'",
        ),
        (
            "[sites.a]\nurl = 's3://bkt/p'\n[sites.b]\nurl = 's3://bkt/p/'\n",
            "site 'b' has the same root as site 'a'",
        ),
        (
            "[sites.a]\nurl = '/data'\n[sites.b]\nurl = 'file:///data'\n",
            "site 'b' has the same root as site 'a'",
        ),
        (
            "[sites.x]\nurl = '/a'\nconcurrency = 5000\n",
            "sites.x.concurrency: Input should be less than or equal to 1024 (got 5000)",
        ),
        ("[sites.x]\nurl = '/a'\nconcurency = 3\n", "sites.x.concurency: unknown key"),
        ("database_url = 'sqlite:///ds.db'\n", "four slashes: sqlite:////ds.db"),
    ],
)
def test_config_mistakes_are_one_line_naming_the_field(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, text)
    assert message in caught.value.message
    assert "\n" not in caught.value.message
    assert caught.value.message.startswith(f"invalid configuration in {tmp_path}")


def test_a_relative_home_in_the_file_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "datasync.toml"
    cfg.write_text("home = 'rel/home'\n")
    with pytest.raises(ConfigError, match="home: 'rel/home' is a relative path"):
        load_settings({"DATASYNC_CONFIG": str(cfg)})


def test_sibling_roots_and_other_schemes_are_not_nested(tmp_path: Path) -> None:
    settings = _load(
        tmp_path,
        "[sites.a]\nurl = '/data/a'\n[sites.b]\nurl = '/data/ab'\n"
        "[sites.c]\nurl = 's3://data/a'\n[sites.d]\nurl = 'gs://data/a'\n"
        # The same bucket on another endpoint is another store.
        "[sites.e]\nurl = 's3://data/a'\noptions = { endpoint_url = 'http://minio:9000' }\n",
    )
    assert sorted(settings.sites) == ["a", "b", "c", "d", "e"]


def test_secrets_in_options_never_reach_the_message(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, "[sites.x]\nurl = 's3://bkt'\noptions = 'SECRETKEY'\n")
    assert "SECRETKEY" not in caught.value.message
    assert "sites.x.options" in caught.value.message


def test_a_mistyped_sqlite_url_is_not_created_by_a_command_that_only_reads(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    typo = tmp_path / "datasnyc.db"
    settings = Settings(home=home, database_url=f"sqlite:///{typo}")
    with pytest.raises(ConfigError, match=r"no database at .*datasnyc\.db"):
        check_database(settings, creates=False)
    check_database(settings, creates=True)  # register, policy apply, the daemons
    missing_dir = Settings(home=home, database_url=f"sqlite:///{tmp_path / 'nope' / 'x.db'}")
    with pytest.raises(ConfigError, match=r"directory .*nope of the database"):
        check_database(missing_dir, creates=True)
    # The default database in $DATASYNC_HOME is made by any command; PostgreSQL is not ours.
    check_database(
        Settings(home=home, database_url=f"sqlite:///{home / 'datasync.db'}"), creates=False
    )
    check_database(Settings(home=home, database_url="postgresql+psycopg://db/x"), creates=False)
    assert not typo.exists()


@pytest.mark.parametrize("label", ["beef", "2026", "3f9c0a", "0" * 63])
def test_labels_that_look_like_id_prefixes_are_refused(label: str) -> None:
    with pytest.raises(UserError, match="looks like a version id prefix"):
        check_label(label)


@pytest.mark.parametrize("label", ["v1", "2026-11-20", "abc", "12", "latest", "Beef", "beefy"])
def test_other_labels_are_fine(label: str) -> None:
    assert check_label(label) == label


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("+99999999999d", "give a time before 9999"),
        ("+1e9d", "use +90s"),
        ("9999-06-01", "give a time before 9999"),
        ("0001-01-01T00:00:00+01:00", "between the year 1 and 9999"),
        ("tomorrow", "use +2h or ISO 8601"),
    ],
)
def test_deadlines_no_calendar_holds_are_bad_input(text: str, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        parse_deadline(text)


def test_deadlines_come_back_in_utc() -> None:
    assert parse_deadline("2026-12-01T08:00+02:00") == datetime(2026, 12, 1, 6, tzinfo=UTC)
    assert parse_deadline("2026-12-01T08:00").tzinfo is UTC  # type: ignore[union-attr]


def test_read_timeouts_are_a_floor_plus_bytes_over_a_minimum_rate() -> None:
    t = Timeouts()
    assert (t.connect, t.read(0)) == (5.0, 10.0)
    assert t.read(3) == pytest.approx(10.0, abs=1e-5)
    assert t.read(64 * MiB) == 74.0  # a 64 MiB part: 10 s + 64 MiB at 1 MiB/s
    custom = Timeouts.from_options({"read_timeout": 2, "min_rate_bytes": 4 * MiB})
    assert custom.read(8 * MiB) == 4.0 and custom.connect == 5.0
    older = Timeouts.from_options({"timeout": 30}, floor="timeout")
    assert older.read_floor == 30.0
    for bad in ({"read_timeout": 0}, {"connect_timeout": "5"}, {"min_rate_bytes": True}):
        with pytest.raises(ConfigError, match="must be a number > 0"):
            Timeouts.from_options(bad)


def test_host_port_names_the_endpoint() -> None:
    assert host_port("http://127.0.0.1:9000/devstoreaccount1/") == "127.0.0.1:9000"
    assert host_port("https://s3.us-west-2.amazonaws.com") == "s3.us-west-2.amazonaws.com:443"
    assert host_port("http://localhost") == "localhost:80"
    assert host_port(None) is None


CS_A = "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=S3CRET;"
CS_B = "DefaultEndpointsProtocol=https;AccountName=other;AccountKey=S3CRET;"
CS_AZURITE = "AccountKey=S3CRET;BlobEndpoint=http://127.0.0.1:1/acct;"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, ("default", None)),
        ({"AZURE_STORAGE_CONNECTION_STRING": CS_A}, ("connection_string", CS_A)),
        ({"AZURE_STORAGE_CONNECTION_STRING": CS_AZURITE}, ("connection_string", CS_AZURITE)),
        # For another account: passed over, and the chain goes on.
        ({"AZURE_STORAGE_CONNECTION_STRING": CS_B}, ("default", None)),
        (
            {"AZURE_STORAGE_CONNECTION_STRING": CS_B, "AZURE_STORAGE_ACCOUNT_KEY": "k"},
            ("account_key", "k"),
        ),
        ({"AZURE_STORAGE_KEY": "k2"}, ("account_key", "k2")),  # the Azure CLI's name
        ({"AZURE_STORAGE_SAS_TOKEN": "sv=1&sig=x"}, ("sas_token", "sv=1&sig=x")),
        ({"AZURE_STORAGE_ACCOUNT": "acct", "AZURE_STORAGE_KEY": "k"}, ("account_key", "k")),
        ({"AZURE_STORAGE_ACCOUNT_NAME": "other", "AZURE_STORAGE_KEY": "k"}, ("default", None)),
    ],
)
def test_azure_credentials_follow_the_environment_in_order(
    env: dict[str, str], expected: tuple[str, str | None]
) -> None:
    assert credential_source("acct", env) == expected


def test_a_site_that_names_its_endpoint_passes_over_the_connection_string() -> None:
    env = {"AZURE_STORAGE_CONNECTION_STRING": CS_A, "AZURE_STORAGE_KEY": "k"}
    assert credential_source("acct", env, connection_string=False) == ("account_key", "k")


def test_a_full_file_system_is_retried_between_attempts_only_with_a_long_pause() -> None:
    policy = RetryPolicy(random=lambda: 0.0)
    full = NoSpace("No space left on device", url="/lustre/x")
    assert full.retryable
    # Within a call: never retried (and not noted as retried).
    calls: list[int] = []

    def write() -> None:
        calls.append(1)
        raise full

    with pytest.raises(NoSpace):
        policy.run(write)
    assert calls == [1] and not getattr(full, "__notes__", None)
    # Between attempts: half to all of 30 s, 60 s, ... 600 s, for 8 attempts in all.
    delays = [policy.task_retry_delay(n, 8, full) for n in range(1, 9)]
    assert delays == [15.0, 30.0, 60.0, 120.0, 240.0, 300.0, 300.0, None]
    assert RetryPolicy(random=lambda: 1.0).task_retry_delay(1, 8, full) == 30.0
    # The task's own max_attempts still caps it; other classes keep their budgets.
    assert policy.task_retry_delay(3, 3, full) is None
    assert policy.task_retry_delay(4, 8, TransientError("x")) is None
    assert RetryPolicy(task_backoff=Backoff(2.0, 300.0)).task_budget(full) == 8


def test_a_backoff_floor_must_be_a_fraction() -> None:
    with pytest.raises(ValueError, match="bad backoff"):
        Backoff(1.0, 2.0, floor=1.5)


def test_site_config_refuses_site_path_and_unknown_scheme_directly() -> None:
    with pytest.raises(ValueError, match="looks like SITE:path"):
        SiteConfig(url="lustre:run-7")
    with pytest.raises(ValueError, match="unknown storage URL scheme"):
        SiteConfig(url="s4://bucket")
