"""The benchmark's smoke mode, run for real so that the benchmark cannot rot.

``python -m bench --quick`` starts the same origin, forwarders and agent as
the full run (fewer requests, a 32 MiB body, vaults of 1 and 100
identities) and must give every peer a figure for every workload. The
figures' sizes are not judged here (this machine is busy with the rest of
the suite); that they exist, are positive and are consistent is.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from support.tools import require_tool

ROOT = Path(__file__).resolve().parent.parent
FORWARDERS = ("nginx", "haproxy", "stunnel", "agent")
TIMEOUT = 300


def _positive(figures: dict, *keys: str) -> None:
    for key in keys:
        value = figures.get(key)
        assert isinstance(value, int | float) and math.isfinite(value) and value > 0, (key, value)


def test_quick_benchmark_gives_every_peer_sane_figures(tmp_path: Path) -> None:
    for tool in ("nginx", "curl", "h2load", "haproxy", "stunnel4"):
        require_tool(tool)
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "quick.json").read_text())
    assert result["errors"] == [] and result["leftovers"] == []
    med = result["medians"]

    assert set(med["A"]) == {"floor", "direct", *FORWARDERS}
    for peer, figures in med["A"].items():
        _positive(figures, "ms_per_request", "client_cpu_us_per_request")
        if peer in FORWARDERS:
            _positive(figures, "peer_cpu_us_per_connection")
    for figures in med["A"].values():  # each round's floor is subtracted from its peers'
        assert math.isfinite(figures["ms_above_floor"])
    assert med["A"]["floor"]["ms_above_floor"] == 0

    assert set(med["B"]) == set(FORWARDERS)
    for figures in med["B"].values():
        _positive(
            figures,
            "req_per_s",
            "p50_ms",
            "p99_ms",
            "peer_cpu_us_per_request",
            "loadgen_cpu_percent",
            "origin_cpu_percent",
        )
        assert figures["p50_ms"] <= figures["p99_ms"]

    assert set(med["C"]) == {"direct", *FORWARDERS}
    for peer, figures in med["C"].items():
        _positive(figures, "get_mb_per_s", "post_mb_per_s")
        if peer in FORWARDERS:
            _positive(figures, "get_rss_rest_mb", "get_rss_peak_mb")
            assert figures["get_rss_peak_mb"] >= figures["get_rss_rest_mb"]

    assert set(med["D_idle"]) == set(FORWARDERS)
    for figures in med["D_idle"].values():
        _positive(figures, "idle_rss_mb", "request_ms_while_held")

    assert set(result["scale"]) == {"1", "100"}
    for size, figures in result["scale"].items():
        assert figures["identities"] == int(size)
        _positive(
            figures,
            "start_s",
            "rss_locked_mb",
            "unlock_cli_s",
            "kdf_s",
            "rss_unlocked_mb",
            "first_req_per_s",
            "route_exact_ns",
            "route_miss_ns",
        )
    _positive(result["scale"]["100"], "last_req_per_s", "route_wildcard_ns")

    # every target got a figure, and the Markdown table was written with the ratios
    assert result["targets"] and all(t["met"] is not None for t in result["targets"])
    table = (tmp_path / "quick.md").read_text()
    assert "× nginx" in table and "| agent |" in table
