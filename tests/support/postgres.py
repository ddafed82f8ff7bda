"""An empty PostgreSQL schema of its own per test (the machine's server, database ``test``)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import OperationalError

from tests.conftest import POSTGRES_URL


@pytest.fixture
def postgres_schema() -> Iterator[Engine]:
    """An engine whose ``search_path`` is a fresh schema, dropped afterwards; fails clearly without a server."""
    admin = create_engine(POSTGRES_URL)
    try:
        with admin.connect() as conn:
            conn.execute(text("select 1"))
    except OperationalError as exc:
        pytest.fail(f"PostgreSQL at {POSTGRES_URL} is not reachable: {exc}")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with admin.begin() as conn:
        conn.execute(text(f'create schema "{schema}"'))
    engine = create_engine(POSTGRES_URL, connect_args={"options": f"-csearch_path={schema}"})
    yield engine
    engine.dispose()
    with admin.begin() as conn:
        conn.execute(text(f'drop schema "{schema}" cascade'))
    admin.dispose()
