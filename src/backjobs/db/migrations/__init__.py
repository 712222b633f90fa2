"""Alembic migrations of the application database (``backjobs db upgrade``)."""
