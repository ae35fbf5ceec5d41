"""The test kit that ships with the package: real servers on free loopback ports (``localvalkey``) and
a write load that keeps a ledger of every acknowledged write (``workload``). The ``demo`` command, the
tests and the benchmarks use it; nothing of the engine, the operator or the providers imports it
(tests/test_layers.py)."""
