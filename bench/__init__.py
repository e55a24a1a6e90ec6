"""The benchmark: mtls-agent against the tools users would pick instead.

``python -m bench`` (README, "Benchmarks") runs an mTLS origin and every
peer on loopback, measures each the same way, and writes the table to
``bench/results/``. Modules: ``pki`` (certificates), ``procs`` (processes
and their cost from /proc), ``peers`` (the origin and the forwarders),
``workloads`` (A, B, C, idle connections), ``scale`` (D, many identities),
``report`` (medians, ratios, targets, Markdown), ``run`` (the command).
"""
