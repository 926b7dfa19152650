"""Settings: file, then environment, parsed once; bad config is a clear ConfigError."""

from __future__ import annotations

from pathlib import Path

import pytest

from datasync.config import load_settings
from datasync.errors import ConfigError


def test_defaults_put_sqlite_in_home(tmp_path: Path) -> None:
    s = load_settings({"DATASYNC_HOME": str(tmp_path)})
    assert s.home == tmp_path
    assert s.database_url == f"sqlite:///{tmp_path / 'datasync.db'}"
    assert s.sites == {}


def test_environment_wins_over_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        'home = "/from/file"\ndatabase_url = "sqlite:////from/file.db"\n'
        '[sites.lustre]\nurl = "/lustre/datasets"\nconcurrency = 4\n'
    )
    env = {
        "DATASYNC_CONFIG": str(cfg),
        "DATASYNC_HOME": str(tmp_path / "h"),
        "DATASYNC_DATABASE_URL": "postgresql+psycopg://db/x",
    }
    s = load_settings(env)
    assert s.home == tmp_path / "h"
    assert s.database_url == "postgresql+psycopg://db/x"
    assert s.sites["lustre"].concurrency == 4
    # Without the variables, the file's values hold.
    s2 = load_settings({"DATASYNC_CONFIG": str(cfg)})
    assert s2.home == Path("/from/file") and s2.database_url == "sqlite:////from/file.db"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[sites.x]\nurl = 1\n", "invalid configuration"),
        ("[sites.x]\nurl = '/a'\nconcurency = 3\n", "concurency"),
        ("[sites.'bad name']\nurl = '/a'\n", "site name"),
        ("chunk_size = 5\n", "chunk_size"),
        ("not toml = = 1", "cannot read config"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_settings({"DATASYNC_CONFIG": str(cfg), "DATASYNC_HOME": str(tmp_path)})


def test_missing_explicit_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings({"DATASYNC_CONFIG": str(tmp_path / "nope.toml")})
