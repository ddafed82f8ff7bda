"""Engine and session factory, and the Alembic upgrade entry point."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from alembic import command

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
ALEMBIC_INI = PROJECT_ROOT / "alembic.ini"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # FULL: the write-ahead log is fsynced at every commit, so an instance row is on disk before its
    # C-STORE is answered Success (NORMAL syncs only at checkpoints: a power loss could lose the row).
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    # No checkpoint inside a commit: SQLite's automatic one (every 1,000 WAL pages) made one C-STORE
    # answer in ~250 wait 20-30 ms for it.  The node's scheduler checkpoints instead (checkpoint()).
    cursor.execute("PRAGMA wal_autocheckpoint=0")
    cursor.close()


def checkpoint(engine: Engine) -> None:
    """Copy SQLite's write-ahead log into the database file (PASSIVE: never blocks writers).

    Run by the node's scheduler every :data:`CHECKPOINT_INTERVAL_S`; a no-op on
    other databases.  SQLite also checkpoints when the last connection closes.
    """
    if engine.dialect.name != "sqlite":
        return
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")


#: How often the scheduler checkpoints SQLite's write-ahead log.
CHECKPOINT_INTERVAL_S = 1.0


def make_engine(url: str) -> Engine:
    """Create an engine; SQLite gets WAL with ``synchronous=FULL``, foreign keys and a busy timeout.

    Commits are durable on every supported database: SQLite fsyncs its
    write-ahead log at each commit, PostgreSQL sessions run with
    ``synchronous_commit=on`` (see docs/edge.md, "Durable before Success").

    Parameters
    ----------
    url : str
        SQLAlchemy database URL.

    Returns
    -------
    Engine
        The engine.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if parsed.get_backend_name() == "postgresql":
        # A commit returns only once its WAL record is flushed, whatever the server's default
        # (options given in the URL, e.g. a search_path, are kept).
        given = parsed.query.get("options", "")
        options = " ".join([*([given] if isinstance(given, str) else list(given)), "-c synchronous_commit=on"])
        return create_engine(parsed.difference_update_query(["options"]), pool_pre_ping=True,
                             connect_args={"options": options.strip()})
    return create_engine(url, pool_pre_ping=True)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Return a session factory bound to *engine* (objects survive commit)."""
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str) -> Config:
    """Alembic configuration for *url*, independent of the working directory."""
    cfg = Config(str(ALEMBIC_INI))
    cfg.set_main_option("script_location", str(PROJECT_ROOT / "alembic"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["configure_logger"] = False
    return cfg


@dataclass
class Database:
    """An engine and its session factory."""

    engine: Engine
    sessions: sessionmaker[Session]


def open_database(url: str, *, migrate: bool = True) -> Database:
    """Open the database at *url*, bringing its schema to head first if *migrate*."""
    if migrate:
        upgrade(url)
    engine = make_engine(url)
    return Database(engine, make_sessionmaker(engine))


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the schema at *url* to *revision* with Alembic."""
    if make_url(url).get_backend_name() == "sqlite":
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
    logger.info("upgrading database schema to %s", revision)
    command.upgrade(alembic_config(url), revision)
