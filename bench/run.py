"""``python -m bench``: the whole benchmark, one command (see README, "Benchmarks").

Sets up the PKI, the origin and every peer on loopback and Unix sockets in a
temporary folder, runs the workloads round by round with the peers' order
rotated, prints the table and writes it as Markdown and JSON. Every process
it started is stopped at the end, whatever happened; a peer that fails a
workload is reported with the error and left out of that figure.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench import report, scale
from bench.peers import FORWARDER_CLASSES, AgentForwarder, Forwarder, Origin, Sink
from bench.pki import build_pki
from bench.procs import BenchError, Service, find_tool, raise_nofile_limit
from bench.workloads import (
    Route,
    idle_connections,
    script_pattern,
    service_pattern,
    streaming,
    write_sparse,
)

RESULTS = Path(__file__).resolve().parent / "results"
WORKLOADS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class Settings:
    """How much each workload does; ``FULL`` is the issue's, ``QUICK`` the smoke test's."""

    quick: bool
    rounds: int
    a_requests: int
    b_clients: int
    b_duration: float
    b_warmup: float
    c_size: int
    idle_connections: int
    scale_sizes: tuple[int, ...]
    d_clients: int
    d_duration: float
    d_warmup: float


FULL = Settings(
    quick=False,
    rounds=3,
    a_requests=300,
    b_clients=64,
    b_duration=10.0,
    b_warmup=2.0,
    c_size=1 << 30,
    idle_connections=1000,
    scale_sizes=(1, 100, 1000, 10000),
    d_clients=16,
    d_duration=2.0,
    d_warmup=0.5,
)
QUICK = Settings(
    quick=True,
    rounds=1,
    a_requests=20,
    b_clients=16,
    b_duration=1.0,
    b_warmup=0.5,
    c_size=32 << 20,
    idle_connections=100,
    scale_sizes=(1, 100),
    d_clients=8,
    d_duration=0.5,
    d_warmup=0.2,
)


class Lab:
    """The origin and the peers, started together and always stopped together."""

    def __init__(self, settings: Settings, forwarders: list[str], keep: bool) -> None:
        self.settings = settings
        self.keep = keep
        self.root = Path(tempfile.mkdtemp(prefix="mtb-run-"))
        self.pki = build_pki(self.root / "pki")
        self.sink = Sink(self.root)
        self.origin = Origin(self.root, self.pki, self.sink, big_size=settings.c_size)
        self.forwarders: dict[str, Forwarder] = {
            name: FORWARDER_CLASSES[name](self.root, self.origin) for name in forwarders
        }
        self.upload_file = write_sparse(self.root / "upload.bin", settings.c_size)
        self.started: list[Service] = []  # every service, D's agents too, for the end check

    def __enter__(self) -> Lab:
        try:
            for service in (self.sink, self.origin, *self.forwarders.values()):
                self.started.append(service)  # first: one that fails half-way is stopped too
                service.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for service in reversed(self.started):
            service.stop()
        if not self.keep:
            for service in self.forwarders.values():
                if isinstance(service, AgentForwarder):
                    service.home.cleanup()
            shutil.rmtree(self.root, ignore_errors=True)

    def pids(self) -> list[int]:
        """Every process started so far that should be gone at the end."""
        found = []
        for service in self.started:
            if service.proc is not None:
                found.append(service.pid)
                found += service.cpu_pids()
        return sorted(set(found))

    # --- the ways through to the origin ---

    def floor(self) -> Route:
        return Route("floor", self.origin.floor_socket, f"http://localhost:{self.origin.port}")

    def direct(self) -> Route:
        p = self.pki
        args = ("--cert", str(p.client_chain), "--key", str(p.client_key), "--cacert", str(p.root))
        return Route("direct", None, f"https://localhost:{self.origin.port}", (), args)

    def through(self, name: str) -> Route:
        fw = self.forwarders[name]
        return Route(name, fw.socket, f"http://localhost:{self.origin.port}", tuple(fw.cpu_pids()))

    def route(self, peer: str) -> Route:
        """The way through ``peer``: a forwarder's name, "floor" or "direct"."""
        if peer == "floor":
            return self.floor()
        if peer == "direct":
            return self.direct()
        return self.through(peer)


def rotated(items: list[str], by: int) -> list[str]:
    if not items:
        return items
    by %= len(items)
    return items[by:] + items[:by]


class Run:
    """One benchmark run: the rounds, the errors, and what is written at the end."""

    def __init__(
        self,
        settings: Settings,
        only: tuple[str, ...],
        forwarders: list[str],
        keep: bool = False,
        say: Callable[[str], None] = print,
    ) -> None:
        self.settings = settings
        self.only = only
        self.forwarder_names = forwarders
        self.keep = keep
        self.say = say
        self.per_peer: dict[str, dict[str, list[dict[str, float]]]] = {}
        self.scale: dict[str, dict[str, Any]] = {}
        self.errors: list[str] = []
        self.leftovers: list[int] = []

    def _record(
        self,
        workload: str,
        peer: str,
        round_no: int,
        measure: Callable[[], dict[str, float]],
        lab: Lab,
    ) -> dict[str, float] | None:
        """Measure one figure set; an error is recorded (and None returned) instead."""
        started = time.perf_counter()
        try:
            figures = measure()
        except (BenchError, OSError) as exc:
            message = f"{workload} {peer}, round {round_no + 1}: {exc}"
            fw = lab.forwarders.get(peer)
            if fw is not None and not fw.alive():
                message += f" (the {peer} process died; its log ends: {fw.log_tail(5)!r})"
            self.errors.append(message)
            self.say(f"  {workload} {peer}: ERROR {exc}")
            return None
        self.per_peer.setdefault(workload, {}).setdefault(peer, []).append(figures)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in list(figures.items())[:3])
        self.say(f"  {workload} {peer}: {shown} ({time.perf_counter() - started:.1f} s)")
        return figures

    def run(self) -> None:
        s = self.settings
        with Lab(s, self.forwarder_names, self.keep) as lab:
            try:
                self._rounds(lab)
                if "D" in self.only and "agent" in self.forwarder_names:
                    self._scale(lab)
            finally:
                pids = lab.pids()
                lab.close()
                self.leftovers = [p for p in pids if _running(p)]
        if self.leftovers:
            self.errors.append(f"processes left running after the end: {self.leftovers}")

    def _rounds(self, lab: Lab) -> None:
        s = self.settings
        fws = list(lab.forwarders)
        for r in range(s.rounds):
            self.say(f"round {r + 1} of {s.rounds}")
            if "A" in self.only:
                measured = {}
                for peer in rotated(["floor", "direct", *fws], r):
                    route = lab.route(peer)
                    measured[peer] = self._record(
                        "A", peer, r, lambda rt=route: script_pattern(rt, s.a_requests), lab
                    )
                floor = measured.get("floor")
                for figures in measured.values():  # the floor of the same round
                    if figures is not None and floor is not None:
                        figures["ms_above_floor"] = (
                            figures["ms_per_request"] - floor["ms_per_request"]
                        )
            if "B" in self.only:
                for peer in rotated(fws, r):
                    self._record(
                        "B",
                        peer,
                        r,
                        lambda p=peer: service_pattern(
                            lab.through(p),
                            tuple(lab.origin.cpu_pids()),
                            lab.root,
                            clients=s.b_clients,
                            duration=s.b_duration,
                            warmup=s.b_warmup,
                        ),
                        lab,
                    )
            if "C" in self.only:
                for peer in rotated(["direct", *fws], r):
                    route = lab.route(peer)
                    self._record(
                        "C", peer, r, lambda rt=route: streaming(rt, s.c_size, lab.upload_file), lab
                    )
            if "D" in self.only:
                for peer in rotated(fws, r):
                    self._record(
                        "D_idle",
                        peer,
                        r,
                        lambda p=peer: idle_connections(lab.through(p), s.idle_connections),
                        lab,
                    )

    def _scale(self, lab: Lab) -> None:
        s = self.settings
        for count in s.scale_sizes:
            self.say(f"D scale: {count} identities")
            agent = scale.new_agent(lab.root, lab.origin, count)
            lab.started.append(agent)
            try:
                figures = scale.measure_size(
                    agent,
                    lab.origin,
                    count,
                    rounds=s.rounds,
                    clients=s.d_clients,
                    duration=s.d_duration,
                    warmup=s.d_warmup,
                )
            except (BenchError, OSError) as exc:
                self.errors.append(f"D scale {count}: {exc}")
                self.say(f"  ERROR {exc}")
                continue
            finally:
                agent.stop()
                agent.home.cleanup()
            self.scale[str(count)] = figures
            self.say("  " + ", ".join(f"{k}={v:.4g}" for k, v in figures.items()))

    def result(self, started: dt.datetime, seconds: float) -> dict[str, Any]:
        med = {w: report.medians(peers) for w, peers in self.per_peer.items()}
        tried = self.settings.scale_sizes if "D" in self.only else ()
        found = report.targets(med, self.scale, self.errors, tried)
        return report.clean(
            {
                "meta": {
                    "started": started.isoformat(timespec="seconds"),
                    "duration_s": round(seconds, 1),
                    "settings": asdict(self.settings),
                    "workloads": list(self.only),
                    "forwarders": self.forwarder_names,
                    "machine": machine(),
                    "versions": versions(),
                },
                "medians": med,
                "rounds": self.per_peer,
                "scale": self.scale,
                "targets": [t.as_json() for t in found],
                "errors": self.errors,
                "leftovers": self.leftovers,
            }
        )


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def _first_line(cmd: list[str]) -> str:
    exe = find_tool(cmd[0])
    if exe is None:
        return "not installed"
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        proc = subprocess.run(
            [exe, *cmd[1:]],
            capture_output=True,
            text=True,
            timeout=10,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        for line in (proc.stdout + proc.stderr).splitlines():
            if line.strip() and "inetd" not in line:
                return line.strip()
    return "unknown"


def versions() -> dict[str, str]:
    from agent import __version__

    found = {
        "mtls-agent": __version__,
        "nginx": _first_line(["nginx", "-v"]),
        "haproxy": _first_line(["haproxy", "-v"]),
        "stunnel": _first_line(["stunnel4", "-version"]),
        "h2load": _first_line(["h2load", "--version"]),
        "curl": _first_line(["curl", "--version"]),
        "openssl": _first_line(["openssl", "version"]),
    }
    with contextlib.suppress(ImportError):
        import uvloop

        found["uvloop"] = uvloop.__version__
    return found


def describe(result: dict[str, Any]) -> list[str]:
    meta = result["meta"]
    s, m, v = meta["settings"], meta["machine"], meta["versions"]
    size = s["c_size"] / (1 << 20)
    return [
        f"Run {meta['started']}, {meta['duration_s']:.0f} s, on {m['cpus']} cores ({m['cpu']}), "
        f"Linux {m['kernel']}, Python {m['python']}.",
        f"Versions: mtls-agent {v['mtls-agent']}, {v['nginx']}, {v['haproxy']}, {v['stunnel']}, "
        f"{v['h2load']}, {v['openssl']}.",
        "",
        f"Each figure is the median of {s['rounds']} round(s), the peers' order rotated each "
        "round; × nginx is the ratio to the nginx forwarder's median in this run. "
        f"A: {s['a_requests']} curl processes per peer. "
        f"B: h2load --h1 -t1, {s['b_clients']} connections, {s['b_duration']:g} s after a "
        f"{s['b_warmup']:g} s warm-up; CPU from /proc (nginx: its worker). "
        f"C: {size:g} MiB each way; RSS sampled every 10 ms. "
        f"D: {s['idle_connections']} idle connections; vaults of "
        f"{', '.join(str(n) for n in s['scale_sizes'])} identities. "
        "MB are 10^6 bytes.",
    ]


def write_outputs(result: dict[str, Any], out: Path, stem: str) -> tuple[Path, str]:
    """Write ``stem.json`` and ``stem.md`` (atomically) into ``out``; return the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    previous = None
    with contextlib.suppress(OSError, ValueError):
        previous = json.loads((out / f"{stem}.json").read_text())
    text = report.markdown(result, previous, lambda: describe(result))
    for suffix, data in (
        (".json", json.dumps(result, indent=1, ensure_ascii=False) + "\n"),
        (".md", text + "\n"),
    ):
        tmp = out / f"{stem}{suffix}.tmp"
        tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, out / f"{stem}{suffix}")
    return out / f"{stem}.md", text


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure mtls-agent against curl's own mTLS and the nginx, HAProxy and "
        "stunnel forwarders on one mTLS origin (see README, 'Benchmarks').",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a short smoke run (the test suite runs it)"
    )
    parser.add_argument("--rounds", type=int, help="rounds per figure (default 3; quick 1)")
    parser.add_argument(
        "--only", default=",".join(WORKLOADS), help="workloads to run, e.g. A,B (default: A,B,C,D)"
    )
    parser.add_argument(
        "--peers",
        default=",".join(FORWARDER_CLASSES),
        help="forwarders to run (default: every installed one)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS,
        help=f"where results go (default {RESULTS}): last.md/.json, or quick.* with --quick",
    )
    parser.add_argument(
        "--identities",
        help="D's vault sizes, e.g. 1,1000 (default 1,100,1000,10000; quick 1,100)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the run's temporary folder")
    args = parser.parse_args(argv)
    args.only = tuple(
        w for w in WORKLOADS if w in {x.strip().upper() for x in args.only.split(",")}
    )
    if not args.only:
        parser.error(f"--only takes some of {','.join(WORKLOADS)}")
    wanted = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = [p for p in wanted if p not in FORWARDER_CLASSES]
    if unknown or "nginx" not in wanted:
        parser.error(
            f"--peers takes {','.join(FORWARDER_CLASSES)} and must include nginx "
            "(every ratio is to it)"
        )
    args.peers = wanted
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    settings = QUICK if args.quick else FULL
    if args.rounds:
        settings = replace(settings, rounds=max(1, args.rounds))
    if args.identities:
        sizes = tuple(sorted({max(1, int(n)) for n in args.identities.split(",") if n.strip()}))
        settings = replace(settings, scale_sizes=sizes)
    for tool in ("nginx", "curl", "h2load"):
        if find_tool(tool) is None:
            print(
                f"bench: {tool} is not installed (Debian: nginx-light, curl, nghttp2-client)",
                file=sys.stderr,
            )
            return 2
    forwarders = []
    for name in args.peers:
        if FORWARDER_CLASSES[name].installed():
            forwarders.append(name)
        else:
            print(f"bench: {name} is not installed; it is left out", file=sys.stderr)
    raise_nofile_limit()
    signal.signal(signal.SIGTERM, _interrupt)
    started, clock = dt.datetime.now().astimezone(), time.perf_counter()
    run = Run(
        settings, args.only, forwarders, keep=args.keep, say=lambda line: print(line, flush=True)
    )
    run.run()
    result = run.result(started, time.perf_counter() - clock)
    path, text = write_outputs(result, args.out, "quick" if settings.quick else "last")
    print()
    print(text)
    print(f"\nwritten: {path} and {path.with_suffix('.json')}")
    return 1 if result["errors"] else 0
