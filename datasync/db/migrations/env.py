"""Alembic environment: migrate the connection handed over by ``datasync.db.migrate``.

The target metadata is ``SQLModel.metadata`` with every table module imported, so
autogenerate sees the manifest tables (0001) and the transfer tables (0002) alike.
Run only through ``datasync.db.migrate.upgrade_to_head``; there is no alembic.ini.
"""

from __future__ import annotations

import importlib
import importlib.util

from alembic import context
from sqlalchemy.engine import Connection
from sqlmodel import SQLModel

# Every module that declares tables. A module that does not exist yet is skipped, so a
# later migration's tables can land in their own module without touching this file.
TABLE_MODULES = ("datasync.db.tables", "datasync.db.transfer_tables", "datasync.db.ops_tables")

for _name in TABLE_MODULES:
    if importlib.util.find_spec(_name) is not None:
        importlib.import_module(_name)

target_metadata = SQLModel.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things in place; batch mode rebuilds tables instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through datasync.db.migrate.upgrade_to_head")
_run(connection)
