"""Alembic migrations for the jobs database (applied by `face-emotions db upgrade`)."""
