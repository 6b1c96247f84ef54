"""The persistence adapter: PostgreSQL through asyncpg behind a narrow interface.

Callers never import asyncpg: driver errors are translated to `engine.errors`."""
