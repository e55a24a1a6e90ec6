"""Medians, ratios to the nginx forwarder, the targets, and the Markdown table.

Every figure is the median over rounds; a ratio is the agent's (or any
peer's) median over nginx's median from the same run. The JSON holds the
rounds too, so a later run can be compared figure by figure
(``previous``: the last run's medians of the same mode).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

BASELINE = "nginx"
MB = 1e6
#: % of one core above which the load generator may be what limits B.
SATURATED = 90.0
#: % CPU of unrelated processes during B above which the run is flagged as noisy.
BUSY = 10.0


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    ratio: bool = True


COLUMNS: dict[str, list[Column]] = {
    "A": [
        Column("ms_per_request", "ms/request"),
        Column("ms_above_floor", "ms above floor"),
        Column("peer_cpu_us_per_connection", "peer CPU µs/connection"),
        Column("client_cpu_us_per_request", "client CPU µs/request", ratio=False),
    ],
    "B": [
        Column("req_per_s", "req/s"),
        Column("p50_ms", "p50 ms"),
        Column("p99_ms", "p99 ms"),
        Column("peer_cpu_us_per_request", "peer CPU µs/request"),
        Column("peer_cpu_percent", "peer CPU %", ratio=False),
        Column("loadgen_cpu_percent", "h2load CPU %", ratio=False),
        Column("origin_cpu_percent", "origin CPU %", ratio=False),
        Column("others_cpu_percent", "other processes' CPU %", ratio=False),
    ],
    "C": [
        Column("get_mb_per_s", "GET MB/s"),
        Column("post_mb_per_s", "POST MB/s"),
        Column("get_rss_rest_mb", "rest RSS MB", ratio=False),
        Column("get_rss_growth_mb", "GET RSS growth MB", ratio=False),
        Column("post_rss_growth_mb", "POST RSS growth MB", ratio=False),
    ],
    "D_idle": [
        Column("idle_kib_per_connection", "KiB per idle connection"),
        Column("idle_rss_mb", "RSS MB with them held", ratio=False),
        Column("request_ms_while_held", "a request meanwhile, ms", ratio=False),
        Column("connect_retries", "connects refused (backlog full)", ratio=False),
    ],
}

TITLES = {
    "A": "A, the script pattern: sequential curl processes, one GET /small each",
    "B": "B, the service pattern: keep-alive connections in a closed loop on /small",
    "C": "C, streaming: GET and POST of the big body",
    "D_idle": "D, idle client connections held open at once",
}

SCALE_COLUMNS = [
    ("identities", "identities"),
    ("populate_s", "setup s"),
    ("start_s", "start s"),
    ("rss_locked_mb", "RSS locked MB"),
    ("unlock_cli_s", "agentctl unlock s"),
    ("kdf_s", "KDF s"),
    ("unlock_after_kdf_s", "unlock after KDF s"),
    ("rss_unlocked_mb", "RSS unlocked MB"),
    ("first_req_per_s", "req/s 1st id"),
    ("last_req_per_s", "req/s last id"),
    ("first_p50_ms", "p50 ms 1st id"),
    ("route_exact_ns", "route exact ns"),
    ("route_wildcard_ns", "route wildcard ns"),
    ("route_miss_ns", "route miss ns"),
]


def median_of(rounds: Iterable[dict[str, float]]) -> dict[str, float]:
    """Each figure's median over the rounds (NaN when no round has it)."""
    rounds = list(rounds)
    keys = dict.fromkeys(k for r in rounds for k in r)
    out = {}
    for key in keys:
        values = [r[key] for r in rounds if key in r and not math.isnan(r[key])]
        out[key] = statistics.median(values) if values else math.nan
    return out


def medians(per_peer: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    return {peer: median_of(rounds) for peer, rounds in per_peer.items() if rounds}


def _num(value: float | None) -> float:
    """A figure, with a missing one (None in the JSON) as NaN."""
    return math.nan if value is None else float(value)


def ratio(value: float | None, base: float | None) -> float:
    value, base = _num(value), _num(base)
    if math.isnan(value) or math.isnan(base) or base == 0:
        return math.nan
    return value / base


# --- targets ------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    workload: str
    what: str
    goal: str
    value: float
    limit: float
    #: True when lower is better (value ≤ limit meets it).
    at_most: bool
    shown: str

    @property
    def met(self) -> bool | None:
        if math.isnan(self.value):
            return None
        return self.value <= self.limit if self.at_most else self.value >= self.limit

    def as_json(self) -> dict[str, Any]:
        return {
            "workload": self.workload,
            "what": self.what,
            "goal": self.goal,
            "value": clean(self.value),
            "met": self.met,
            "shown": self.shown,
        }


def targets(
    med: dict[str, dict[str, dict[str, float]]],
    scale: dict[str, dict[str, Any]],
    errors: list[str],
    tried_sizes: tuple[int, ...] = (),
) -> list[Target]:
    """The issue's targets, evaluated on this run's medians.

    D's targets that name a vault size are listed when that size was tried
    (``tried_sizes``): a failed one shows as "no figure", a size left out of
    a short run is not a target of that run.
    """
    found: list[Target] = []

    def vs_nginx(workload: str, key: str, what: str, limit: float, at_most: bool) -> None:
        peers = med.get(workload, {})
        agent, base = peers.get("agent", {}), peers.get(BASELINE, {})
        r = ratio(agent.get(key, math.nan), base.get(key, math.nan))
        sign = "≤" if at_most else "≥"
        found.append(
            Target(workload, what, f"{sign} {limit:g}× nginx", r, limit, at_most, _fmt_ratio(r))
        )

    vs_nginx("A", "ms_per_request", "mean ms per request", 1.05, True)
    vs_nginx("A", "peer_cpu_us_per_connection", "CPU per new client connection", 2.0, True)
    vs_nginx("B", "req_per_s", "req/s", 0.9, False)
    vs_nginx("B", "peer_cpu_us_per_request", "CPU per request", 1.5, True)
    vs_nginx("B", "p99_ms", "p99 latency", 1.2, True)
    vs_nginx("C", "get_mb_per_s", "GET MB/s", 1.0, False)
    vs_nginx("C", "post_mb_per_s", "POST MB/s", 1.0, False)
    agent_c = med.get("C", {}).get("agent", {})
    growths = [agent_c.get(k, math.nan) for k in ("get_rss_growth_mb", "post_rss_growth_mb")]
    growth = max((g for g in growths if not math.isnan(g)), default=math.nan)
    found.append(
        Target("C", "RSS growth while streaming", "≤ 16 MB", growth, 16, True, f"{_fmt(growth)} MB")
    )
    if 1000 in tried_sizes:
        thousand = scale.get("1000", {}).get("unlock_after_kdf_s", math.nan)
        found.append(
            Target(
                "D",
                "unlock of 1,000 identities after the KDF",
                "≤ 3 s",
                thousand,
                3.0,
                True,
                f"{_fmt(thousand)} s",
            )
        )
    if scale:
        sizes = sorted(scale, key=int)
        low, high = scale[sizes[0]], scale[sizes[-1]]
        span = f"{sizes[0]} → {sizes[-1]} identities"
        for key, what in (
            ("route_exact_ns", "in-process route"),
            ("route_miss_ns", "in-process miss"),
        ):
            r = ratio(high.get(key, math.nan), low.get(key, math.nan))
            found.append(
                Target(
                    "D",
                    f"{what}, {span}",
                    "flat (≤ 1.5×)",
                    r,
                    1.5,
                    True,
                    f"{_fmt(low.get(key, math.nan))} → {_fmt(high.get(key, math.nan))} ns",
                )
            )
        r = ratio(high.get("first_req_per_s", math.nan), low.get("first_req_per_s", math.nan))
        found.append(
            Target(
                "D",
                f"req/s through the agent, {span}",
                "flat (≥ 0.9×)",
                r,
                0.9,
                False,
                _fmt_ratio(r),
            )
        )
    if 1 in tried_sizes:
        one = scale.get("1", {}).get("rss_unlocked_mb", math.nan)
        found.append(
            Target("D", "idle RSS with 1 identity", "≤ 40 MB", one, 40, True, f"{_fmt(one)} MB")
        )
    idle = med.get("D_idle", {}).get("agent")
    failed = any(e.startswith("D_idle agent") for e in errors)
    if idle is not None or failed:
        held = 0.0 if failed else 1.0
        shown = "no (see Errors)" if failed else "yes"
        found.append(
            Target(
                "D",
                "idle client connections held open at once",
                "all stay open",
                held,
                1.0,
                False,
                shown,
            )
        )
    return found


# --- formatting ---------------------------------------------------------------------


def clean(value: Any) -> Any:
    """NaN becomes None in JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean(v) for v in value]
    return value


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _fmt_ratio(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.2f}×"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def workload_table(workload: str, peers: dict[str, dict[str, float]]) -> list[str]:
    columns = COLUMNS[workload]
    base = peers.get(BASELINE, {})
    header = ["peer"]
    for col in columns:
        header.append(col.label)
        if col.ratio:
            header.append("× nginx")
    rows = []
    for peer, figures in peers.items():
        row = [peer]
        for col in columns:
            value = figures.get(col.key, math.nan)
            row.append(_fmt(value))
            if col.ratio:
                row.append(_fmt_ratio(ratio(value, base.get(col.key, math.nan))))
        rows.append(row)
    return _table(header, rows)


def scale_table(scale: dict[str, dict[str, Any]]) -> list[str]:
    header = [label for _, label in SCALE_COLUMNS]
    rows = []
    for size, figures in sorted(scale.items(), key=lambda kv: int(kv[0])):
        cells = [f"{int(size):,}"]
        cells += [_fmt(_num(figures.get(key))) for key, _ in SCALE_COLUMNS[1:]]
        rows.append(cells)
    return _table(header, rows)


def targets_table(found: list[dict[str, Any]]) -> list[str]:
    """Targets in their JSON form (``Target.as_json``): the table reads the saved run too."""
    marks = {True: "met", False: "**missed**", None: "no figure"}
    rows = [[t["workload"], t["what"], t["goal"], t["shown"], marks[t["met"]]] for t in found]
    return _table(["workload", "agent's figure", "target", "this run", ""], rows)


def comparison_table(now: dict[str, Any], before: dict[str, Any]) -> list[str]:
    """The agent's medians now and in the previous run of the same mode."""
    rows = []
    for workload, columns in COLUMNS.items():
        old = before.get("medians", {}).get(workload, {}).get("agent", {})
        new = now.get("medians", {}).get(workload, {}).get("agent", {})
        for col in columns:
            a, b = old.get(col.key), new.get(col.key)
            if a is None or b is None:
                continue
            change = f"{(b - a) / a * 100:+.1f} %" if a else "–"
            rows.append([workload, col.label, _fmt(a), _fmt(b), change])
    for size, figures in now.get("scale", {}).items():
        old_figures = before.get("scale", {}).get(size, {})
        for key, label in SCALE_COLUMNS[1:]:
            a, b = old_figures.get(key), figures.get(key)
            if a is None or b is None:
                continue
            change = f"{(b - a) / a * 100:+.1f} %" if a else "–"
            rows.append([f"D, {int(size):,} identities", label, _fmt(a), _fmt(b), change])
    return _table(["workload", "agent", "previous run", "this run", "change"], rows)


def checks(med: dict[str, Any]) -> list[str]:
    """Whether B's figures can be trusted: the load generator and the machine."""
    b = med.get("B", {}).values()
    loadgen = [f["loadgen_cpu_percent"] for f in b if f.get("loadgen_cpu_percent") is not None]
    others = [f["others_cpu_percent"] for f in b if f.get("others_cpu_percent") is not None]
    found = []
    if loadgen:
        top = max(loadgen)
        verdict = (
            "not the bottleneck."
            if top < SATURATED
            else "**saturated: B's figures are capped by the load generator.**"
        )
        found.append(f"- B: h2load (one thread) used at most {top:.0f} % of a core: {verdict}")
    if others and max(others) > BUSY:
        found.append(
            f"- B: other processes used up to {max(others):.0f} % CPU meanwhile: the machine "
            "was not quiet, so the figures are noisier than they should be."
        )
    return found


def markdown(
    result: dict[str, Any], previous: dict[str, Any] | None, describe: Callable[[], list[str]]
) -> str:
    """The whole report as Markdown (also what the console shows)."""
    med = result["medians"]
    lines = ["# mtls-agent benchmark", "", *describe(), ""]
    lines += ["## Targets (agent vs the nginx forwarder, same run)", ""]
    lines += [*targets_table(result["targets"]), ""]
    lines += [*checks(med), ""]
    for workload, title in TITLES.items():
        if med.get(workload):
            lines += [f"## {title}", "", *workload_table(workload, med[workload]), ""]
    if result.get("scale"):
        lines += ["## D, scale: the agent with many identities", ""]
        lines += [*scale_table(result["scale"]), ""]
    if result.get("errors"):
        lines += ["## Errors", ""] + [f"- {e}" for e in result["errors"]] + [""]
    if previous is not None:
        lines += [
            f"## Against the previous run ({previous.get('meta', {}).get('started', '?')})",
            "",
        ]
        lines += [*comparison_table(result, previous), ""]
    return "\n".join(lines)
