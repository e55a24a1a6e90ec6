"""``python -m bench.profile``: where the agent's time goes under workload B or A.

Starts the origin and the agent as the benchmark does, drives B's closed
loop with h2load (or A's sequential curl processes), and samples the agent
with py-spy (``pip install py-spy``; sampling a non-dumpable process needs
root or CAP_SYS_PTRACE). Prints the functions with the most samples, by
their own time and with what they call, and leaves the collapsed stacks
(for flame graphs) in ``--out``. Samples of threads waiting on a lock (the
thread pool, the audit writer between batches) are left out. py-spy samples
wall-clock time: a process that is runnable but preempted is seen where it
stopped, often in a ``write`` that woke its peer; ``perf record -g -p PID``
gives the on-CPU view.

    python -m bench.profile [--workload B|A] [--seconds 10] [--clients 64] [--native] [--out DIR]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from bench.procs import BenchError, find_tool, raise_nofile_limit
from bench.run import QUICK, RESULTS, Lab
from bench.workloads import CURL_LOOP, h2load


def h2load_exe() -> str:
    exe = find_tool("h2load")
    if exe is None:
        raise BenchError("h2load is not installed (Debian: nghttp2-client)")
    return exe


TOP = 25
#: Frames of a thread that waits, not works.
IDLE = ("PyThread_acquire_lock_timed", "Condition.wait", "Event.wait", "_worker (")


def _frame(name: str) -> str:
    """``func (path/to/file.py:123)`` without the folders before the project's own."""
    for marker in ("/agent/", "/site-packages/", "/lib/python"):
        if marker in name:
            head, _, tail = name.partition(marker)
            func = head.split(" (")[0]
            return f"{func} ({marker.strip('/')}/{tail}"
    return name


def summarize(collapsed: Path) -> str:
    """Self and inclusive sample counts per function, from py-spy's raw format."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        if any(marker in stack for marker in IDLE):
            continue
        total += n
        frames = [_frame(f) for f in stack.split(";")]
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    if not total:
        return "no samples"
    lines = [f"{total} samples", "", "own time:"]
    lines += [f"  {n / total * 100:5.1f} %  {f}" for f, n in own.most_common(TOP)]
    lines += ["", "with callees:"]
    lines += [f"  {n / total * 100:5.1f} %  {f}" for f, n in inclusive.most_common(TOP)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--workload", choices=("B", "A"), default="B")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--native", action="store_true", help="include C frames (py-spy --native)")
    parser.add_argument("--out", type=Path, default=RESULTS / "profile")
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        print("bench.profile: py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 2
    raise_nofile_limit()
    args.out.mkdir(parents=True, exist_ok=True)
    raw = args.out / f"agent-{args.workload.lower()}.collapsed"
    with Lab(QUICK, ["nginx", "agent"], keep=False) as lab:
        agent = lab.forwarders["agent"]
        url = lab.origin.plain_url("/small")
        h2load(agent.socket, url, clients=args.clients, duration=2.0, log=None)  # warm the pool
        if args.workload == "B":
            load = [
                h2load_exe(),
                "--h1",
                "-t1",
                f"-c{args.clients}",
                "-D",
                f"{round(args.seconds) + 3}s",
                "-B",
                f"unix:{agent.socket}",
                url,
            ]
        else:  # curl processes one after another, for longer than py-spy samples
            one = lab.through("agent").curl("/small", "-o", "/dev/null")
            load = ["sh", "-c", CURL_LOOP, "sh", str(round(args.seconds * 400)), *one]
        driver = subprocess.Popen(load, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(1.0)
            spy = [
                py_spy,
                "record",
                "-p",
                str(agent.pid),
                "-d",
                f"{round(args.seconds)}",
                "-r",
                "250",
                "-f",
                "raw",
                "-o",
                str(raw),
            ]
            if args.native:
                spy.append("--native")
            proc = subprocess.run(spy, capture_output=True, text=True, timeout=args.seconds + 60)
            if proc.returncode != 0:
                raise BenchError(f"py-spy failed: {proc.stderr.strip()[-500:]}")
        finally:
            driver.kill()
            driver.wait()
    text = summarize(raw)
    raw.with_suffix(".txt").write_text(text + "\n")
    print(text)
    print(f"\nraw stacks: {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
