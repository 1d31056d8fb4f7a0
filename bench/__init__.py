"""crm-bridge benchmarks (not tests): the delivery pipeline and the config cache.

Run with ``make bench`` (``python -m bench``); ``BENCH_ARGS="--only pipeline.b --quick"``
narrows and shortens a run. Every benchmark starts from a fresh database cloned from a
migrated template, drives the real daemon where its target says so, and ends as rows of
one table (also written to ``.bench/results.json``). docs/benchmarks.md says what each one
measures and how.
"""
