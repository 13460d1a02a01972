"""Counting the FUSE requests pyunion serves per workload (from its -d log), to see where time goes.

    .venv/bin/python -m bench.requests [--workloads stat,ls_lR] [--profile full|tiny] [--out DIR]

Each scenario runs once on a fresh debug mount; for every timed step it prints the number of
requests by operation. Debug logging slows the daemon, so this counts, it does not time.
"""

import collections
import re
import sys
import time
from pathlib import Path

from bench.layers import PROFILES, LayerError, ensure_layers
from bench.run import DEFAULT_OUT, BenchError, Parser, _choose, run_command
from bench.scratch import Scratch
from bench.systems import MountError, Pyunion
from bench.workloads import SCENARIOS_BY_NAME, environment

REQUEST = re.compile(rb"unionfs\.session: ([a-z_0-9]+)\(")
SETTLE = 0.3  # seconds for asynchronous requests (release, forget) to arrive after a command


class DebugPyunion(Pyunion):
    """pyunion with -d: every request is logged."""

    mount_args = ("-d",)


def count_requests(log: Path, start: int) -> tuple[collections.Counter, int]:
    data = log.read_bytes()
    return collections.Counter(m.decode() for m in REQUEST.findall(data, start)), len(data)


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m bench.requests", description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default=",".join(SCENARIOS_BY_NAME))
    p.add_argument("--profile", choices=sorted(PROFILES), default="full")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    try:
        args = p.parse_args(sys.argv[1:] if argv is None else argv)
        names = _choose(args.workloads, SCENARIOS_BY_NAME, "workload")
        out = args.out.resolve()
        layers = ensure_layers(out, PROFILES[args.profile], log=lambda m: print(m, file=sys.stderr))
        system = DebugPyunion()
        with Scratch(out, lambda m: print(m, file=sys.stderr)) as scratch:
            _count_each(names, system, layers, scratch)
    except (BenchError, LayerError, MountError) as e:
        print(f"bench.requests: {e}", file=sys.stderr)
        return 2 if isinstance(e, BenchError) else 1
    return 0


def _count_each(names, system, layers, scratch) -> None:
    for name in names:
        scenario = SCENARIOS_BY_NAME[name]
        mounted = system.mount(layers, scratch, scenario.private, scenario.writes)
        try:
            env = environment(mounted.path, layers)
            for step in scenario.steps:
                time.sleep(SETTLE)
                _, start = count_requests(mounted.log, 0)
                _, problem = run_command(step.command, env)
                time.sleep(SETTLE)
                counts, _ = count_requests(mounted.log, start)
                if problem:
                    print(f"{step.name}: failed: {problem}")
                elif step.timed:
                    ops = ", ".join(f"{op} {n}" for op, n in counts.most_common())
                    print(f"{step.name}: {sum(counts.values())} requests: {ops}", flush=True)
        finally:
            system.unmount(mounted)


if __name__ == "__main__":
    sys.exit(main())
