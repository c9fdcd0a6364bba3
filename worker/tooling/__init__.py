"""Tooling around the worker, not part of ``worker run``: the demo provider and the sample
publisher (compose runs both), the demo, and the fleet of real processes that the demo, the
fault suite and the benchmarks start. Nothing in the runtime modules imports from here."""
