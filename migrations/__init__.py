"""Alembic migrations of the policy store; the only way its schema is created.

Run with ``exitwise db upgrade`` (or ``exitwise.policies.db.upgrade(url)``); the Alembic ``Config``
is built in code with ``script_location`` = this package, so the installed console script
finds it. ``migrations/alembic.ini`` is for developers running ``alembic`` by hand.
"""
