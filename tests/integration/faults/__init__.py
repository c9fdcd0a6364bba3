"""The fault-injection suite (issue 3): real ``worker run`` processes against the real broker
and database, under crashes, broker and database faults, races and bad input.

``pytest -s tests/integration/faults`` prints each scenario's figures (messages, lost,
duplicate requests, stale sends, recovery) and appends them to ``/tmp/nw-faults-summary.txt``.
``-m "not faults"`` leaves the suite out.
"""
