"""Core statements compiled once and run on the driver's cursor, for the C-STORE hot path.

SQLAlchemy's execution layer costs about 0.1 ms per statement on top of the
driver (parameter processing, result set-up, event hooks); a received
instance needs five statements, so it was a third of the C-STORE handler.
:class:`DriverStatement` compiles a Core statement once for the engine's
dialect (SQLite, PostgreSQL) and keeps what SQLAlchemy would do per call that
matters here: the dialect's SQL text and parameter style, literal values, and
each parameter's bind processor (e.g. SQLite's date-time format).  The SQL is
SQLAlchemy's own, so the schema Alembic owns stays the only definition.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement

from core.errors import ConfigError


class DriverStatement:
    """A Core statement, compiled for *engine*'s dialect, run on a DBAPI cursor.

    Parameters
    ----------
    engine : Engine
        The engine whose dialect compiles the statement.
    statement : ClauseElement
        A Core INSERT, UPDATE or SELECT with named bind parameters.
    keys : sequence of str, optional
        For an INSERT without values: the columns given at execution.
    """

    def __init__(self, engine: Engine, statement: ClauseElement, keys: Sequence[str] | None = None) -> None:
        dialect = engine.dialect
        compiled = statement.compile(dialect=dialect, column_keys=list(keys) if keys is not None else None)
        if not isinstance(compiled, SQLCompiler):
            raise ConfigError(f"not a SQL statement: {type(statement).__name__}")
        self._compiled = compiled
        self.sql = compiled.string
        self.positional = bool(compiled.positional)
        self.order: tuple[str, ...] = tuple(compiled.positiontup or ())
        self.processors: dict[str, Callable[[Any], Any]] = {}
        for bind, name in compiled.bind_names.items():
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                self.processors[name] = processor

    def parameters(self, values: Mapping[str, Any]) -> Sequence[Any] | dict[str, Any]:
        """The driver's parameters for *values* (literal values added, bind processors applied)."""
        params = dict(self._compiled.construct_params(dict(values)) or {})
        for name, processor in self.processors.items():
            if name in params:
                params[name] = processor(params[name])
        if self.positional:
            return tuple(params[name] for name in self.order)
        return params

    def execute(self, cursor: Any, values: Mapping[str, Any]) -> Any:
        """Run on *cursor* (a DBAPI cursor); returns the cursor."""
        cursor.execute(self.sql, self.parameters(values))
        return cursor


@contextmanager
def driver_transaction(engine: Engine) -> Iterator[Any]:
    """A pooled DBAPI connection's cursor in one transaction: committed, or rolled back on error.

    Driver errors are raised as SQLAlchemy's (``IntegrityError``, ``OperationalError``...),
    like everywhere else in the node.
    """
    driver_error = engine.dialect.loaded_dbapi.Error
    connection = engine.raw_connection()
    try:
        cursor = connection.cursor()
        try:
            yield cursor
            connection.commit()
        except driver_error as exc:
            connection.rollback()
            raise DBAPIError.instance(None, None, exc, driver_error) from exc
        except BaseException:
            connection.rollback()
            raise
        finally:
            cursor.close()
    finally:
        connection.close()  # back to the pool
