"""``worker-admin``, the dead-letter admin (SPEC §6): list, show, replay, purge, stats.

- :mod:`worker.admin.cli`: arguments, commands, exit statuses (``main``, ``run_admin``);
- :mod:`worker.admin.queries`: the filters and the SQL on ``dead_letters``;
- :mod:`worker.admin.replay`: the replay, batch by batch, transaction by transaction;
- :mod:`worker.admin.render`: tables and JSON;
- :mod:`worker.admin.errors`: usage errors (exit 2) and failures (exit 1), one line each.
"""

from __future__ import annotations

from worker.admin.cli import main, run_admin

__all__ = ["main", "run_admin"]
