"""``register`` from s3://, az://, gs:// and ``SITE:path`` gives the same version id as the
same tree registered from a local directory (issue 3, item 5), through the service that the
CLI and API call, against the real emulators."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from datasync.bootstrap import bootstrap
from datasync.errors import UserError
from tests.fixtures.replication import cloud_site, make_tree, settings_for, upload_tree

pytestmark = pytest.mark.emulator


@pytest.mark.parametrize("kind", ["s3", "azure", "gcs"])
def test_cloud_url_and_site_path_match_local_directory(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    files = make_tree(tmp_path / "tree", shards=(2 * 1024 * 1024 + 17,))
    site = cloud_site("pipeline", kind, request)
    upload_tree(site.backend(), "drops/day1/", files)
    settings = settings_for(tmp_path / "home", f"sqlite:///{tmp_path / 'ds.db'}", [site])
    with bootstrap(settings) as app:
        local = app.service.register_directory("drive/tokyo", tmp_path / "tree")
        by_url = app.service.register("drive/tokyo", f"{site.config.url}/drops/day1")
        by_site = app.service.register("drive/tokyo", "pipeline:drops/day1/")
        assert by_url.version_id == local.version_id == by_site.version_id
        assert not by_url.created and not by_site.created
        assert by_url.files == len(files)
        with pytest.raises(UserError, match="no site named"):
            app.service.register("drive/tokyo", "nosuchsite:drops/day1")


def test_schemes_without_a_backend_are_read_through_fsspec(tmp_path: Path) -> None:
    """A zip archive (fsspec's ``zip://``) registers to the same id as the unpacked tree."""
    files = make_tree(tmp_path / "tree")
    archive = tmp_path / "tree.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    settings = settings_for(tmp_path / "home", f"sqlite:///{tmp_path / 'ds.db'}", [])
    with bootstrap(settings) as app:
        local = app.service.register_directory("drive/zipped", tmp_path / "tree")
        zipped = app.service.register("drive/zipped", f"zip://::file://{archive}")
        assert zipped.version_id == local.version_id and not zipped.created
