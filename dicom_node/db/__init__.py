"""The database: models, sessions and hot-path statements, audit queries, the clinical notes store.

Alembic (alembic/) owns the schema; everything above reads and writes through here.
"""
