"""The benchmark command: installs peers, builds layers, runs every workload on every system."""

import argparse
import contextlib
import importlib.util
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench import report
from bench.layers import PROFILES, LayerError, ensure_layers
from bench.scratch import Scratch
from bench.systems import DEFAULT_SYSTEMS, SYSTEMS, MountError, PyunionUring, SlowExit, System
from bench.workloads import SCENARIOS_BY_NAME, Scenario, environment, timed_steps

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "out"
DEFAULT_REPS = 7
STEP_TIMEOUT = 300.0  # seconds; far beyond any healthy run of a workload
PREFAULT_CHUNK = 1 << 30
PREFAULT_MARGIN = 4 << 30  # RAM always left to everything else while prefaulting
PAGE_REPORTING_ORDER = Path("/sys/module/page_reporting/parameters/page_reporting_order")
FUSE_URING = Path("/sys/module/fuse/parameters/enable_uring")


class BenchError(Exception):
    """A failure that ends the benchmark; printed as one line."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise BenchError(message)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog="python -m bench", description=__doc__)
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                   help=f"comma-separated, from {','.join(SYSTEMS)} "
                        f"(default: {','.join(DEFAULT_SYSTEMS)})")
    p.add_argument("--workloads", default=",".join(SCENARIOS_BY_NAME),
                   help=f"comma-separated, from {','.join(SCENARIOS_BY_NAME)} (default: all)")
    p.add_argument("--reps", type=int, default=DEFAULT_REPS,
                   help=f"repetitions, each on a fresh mount (default {DEFAULT_REPS})")
    p.add_argument("--profile", choices=sorted(PROFILES), default="full",
                   help="data set: full (Debian minbase + Python stdlib, default) or tiny")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="cache and results directory (default bench/out)")
    p.add_argument("--mirror", help="Debian mirror for debootstrap (default: the one apt uses)")
    p.add_argument("--no-install", action="store_true",
                   help="do not apt-get/pip install missing peers or matplotlib")
    p.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    p.add_argument("--no-prefault", action="store_true",
                   help="do not touch free memory once (nor hold free page reporting off) "
                   "before measuring")
    p.add_argument("--record", action="store_true",
                   help="also write bench/RESULTS.md and bench/results.png")
    args = p.parse_args(argv)
    args.systems = _choose(args.systems, SYSTEMS, "system")
    args.workloads = _choose(args.workloads, SCENARIOS_BY_NAME, "workload")
    if args.reps < 1:
        raise BenchError("--reps must be at least 1")
    return args


def _choose(text: str, known: dict, what: str) -> list[str]:
    names = [n for n in text.split(",") if n]
    for n in names:
        if n not in known:
            raise BenchError(f"unknown {what} {n!r} (choose from {', '.join(known)})")
    if not names:
        raise BenchError(f"no {what} chosen")
    return [n for n in known if n in names]  # canonical order


def install_requirements(args) -> None:
    """apt-get the peers (and debootstrap) that are missing; pip install the bench extra."""
    packages, missing = [], []
    for name in args.systems:
        system = SYSTEMS[name]
        if system.missing_programs():
            packages += system.apt_packages
            missing += system.missing_programs()
    if PROFILES[args.profile].base == "debootstrap" and not shutil.which("debootstrap"):
        packages.append("debootstrap")
        missing.append("debootstrap")
    if packages:
        if args.no_install:
            raise BenchError(f"missing {', '.join(missing)} (apt-get install {' '.join(packages)})")
        log(f"installing {' '.join(packages)} ...")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False)
        done = subprocess.run(["apt-get", "install", "-y", "-qq", *packages], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise BenchError(f"apt-get install {' '.join(packages)} failed: "
                             f"{(done.stderr.strip().splitlines() or ['?'])[-1]}")
    if not args.no_chart and importlib.util.find_spec("matplotlib") is None:
        if args.no_install:
            log("matplotlib is missing: no chart (pip install -e '.[bench]')")
            args.no_chart = True
            return
        log("installing the bench extra (matplotlib) ...")
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                               "--disable-pip-version-check", "-e", f"{ROOT}[bench]"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            log("could not install matplotlib: no chart")
            args.no_chart = True


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_memory() -> int:
    """Unused RAM (MemFree: not counting the page cache, which must stay)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemFree:"):
                return int(line.split()[1]) << 10
    return 0


def prefault_memory(margin: int = PREFAULT_MARGIN) -> int:
    """Touch free RAM once so later page allocations do not pay first-touch costs; returns bytes.

    In a VM the host may back guest memory lazily: the first use of a page is several times
    slower than later ones, which makes copy-up and FUSE page-cache fills bimodal. Only free
    memory is used, never closer than `margin`, so the page cache is not evicted.
    """
    held = []
    try:
        while free_memory() > margin + PREFAULT_CHUNK:
            held.append(b"\1" * PREFAULT_CHUNK)
    except MemoryError:
        pass
    touched = len(held) * PREFAULT_CHUNK
    del held
    return touched


@contextlib.contextmanager
def page_reporting_held_off(saved: Path, knob: Path = PAGE_REPORTING_ORDER):
    """Keep the kernel from handing freed memory back to the hypervisor while measuring; yields
    (old order, new order), or None where there is no such setting or it cannot be changed.

    With free page reporting (virtio-balloon), memory the kernel frees goes back to the host
    at once, and its next use pays first-touch faults again: copying the 512 MiB file took
    1.6 s instead of 0.15 s whenever the copy landed on such memory (every writing scenario
    frees its files' page cache at unmount), for whichever system came next. Only blocks of
    at least the reporting order are reported: the largest order the kernel accepts (one past
    its largest block) stops it. The old order is put back afterwards; it is kept in SAVED
    meanwhile, so that the next run puts it back after a run that was killed.
    """
    try:
        old = int(saved.read_text()) if saved.exists() else int(knob.read_text())
    except (OSError, ValueError):
        yield None
        return
    saved.write_text(f"{old}\n")
    new = None
    for order in range(max(old, 32), old, -1):  # (the first the kernel takes is the largest)
        try:
            knob.write_text(f"{order}\n")
        except OSError:
            continue
        new = order
        break
    try:
        yield (old, new) if new is not None else None
    finally:
        knob.write_text(f"{old}\n")
        saved.unlink()


@contextlib.contextmanager
def fuse_uring_enabled(saved: Path, knob: Path = FUSE_URING):
    """Let FUSE daemons use io_uring during the run (for `pyunion -o uring`; the peers in this
    run do not ask for it); yields whether it is on. The old setting is put back afterwards,
    and kept in SAVED meanwhile, as for page_reporting_held_off."""
    try:
        old = saved.read_text().strip() if saved.exists() else knob.read_text().strip()
        saved.write_text(f"{old}\n")
        knob.write_text("Y\n")
    except OSError:
        yield False
        return
    try:
        yield True
    finally:
        knob.write_text(f"{old}\n")
        saved.unlink()


def warm_page_cache(root: Path) -> None:
    """Read every backing file once so that all systems start from the page cache."""
    subprocess.run(["bash", "-o", "pipefail", "-c", 'tar cf - -C "$1" . | cat > /dev/null', "sh",
                    str(root)], check=False)


class Collector:
    """Samples, failures and peak memory gathered over the whole run."""

    def __init__(self, steps):
        self.samples = {s.name: {} for s in steps}
        self.errors = {s.name: {} for s in steps}
        self.cpu = {s.name: {} for s in steps}
        self.exits = {s.name: {} for s in steps}  # FUSE daemons, after workloads that write
        self.memory = {}
        self.failures = []
        self.warnings = []

    def fail(self, step_names, system: str, message: str) -> None:
        for name in step_names:
            self.errors[name].setdefault(system, []).append(message)


def run_command(command: str, env: dict, timeout: float = STEP_TIMEOUT) -> tuple[float, str | None]:
    """Run one workload command; its wall time, and its last error line if it failed."""
    start = time.perf_counter()
    proc = subprocess.Popen(["bash", "-o", "pipefail", "-c", command], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # a hung filesystem: stop the whole pipeline
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return time.perf_counter() - start, f"no result after {timeout:.0f} s (killed)"
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        last = (stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return elapsed, last
    return elapsed, None


def run_scenario(scenario: Scenario, system: System, layers, scratch: Scratch,
                 collector: Collector) -> str:
    """One fresh mount of `system`, the scenario's steps on it; returns a progress line."""
    timed = [s.name for s in scenario.steps if s.timed]
    try:
        mounted = system.mount(layers, scratch, scenario.private, scenario.writes)
    except MountError as e:
        collector.fail(timed, system.name, str(e))
        return f"mount failed: {e}"
    times, cpu, problem = {}, {}, None
    try:
        env = environment(mounted.path, layers)
        if scenario.writes:  # no system's timed writes wait behind data another one left dirty
            os.sync()
        for step in scenario.steps:
            cpu_before = mounted.cpu_seconds()
            elapsed, problem = run_command(step.command, env)
            if problem:
                problem = f"{step.name}: {problem}"
                break
            if step.timed:
                times[step.name] = elapsed
                if cpu_before is not None:
                    cpu[step.name] = mounted.cpu_seconds() - cpu_before
        if not problem and scenario.check:
            problem = scenario.check(mounted.path, layers)
        if scenario.memory and mounted.pid:
            peak = mounted.peak_memory_kib()
            if peak:
                collector.memory.setdefault(system.name, []).append(peak)
    finally:
        try:
            system.unmount(mounted)
        except SlowExit as e:  # the measurement stands; the anomaly is reported
            collector.warnings.append(f"{scenario.name} on {system.name}: {e}")
            log(f"warning: {e}")
        except MountError as e:
            problem = problem or str(e)
        if scenario.writes:
            os.sync()
    if problem:
        if mounted.log and mounted.log.exists():  # keep the daemon's log for the post-mortem
            kept = mounted.log.with_name(f"failed-{system.name}-{scenario.name}-{os.getpid()}-"
                                         f"{len(collector.failures)}.log")
            shutil.copyfile(mounted.log, kept)
            problem += f" (daemon log: {kept})"
        collector.failures.append(problem)
        collector.fail(timed, system.name, problem)
        return f"FAILED {problem}"
    for name, elapsed in times.items():
        collector.samples[name].setdefault(system.name, []).append(elapsed)
    for name, seconds in cpu.items():
        collector.cpu[name].setdefault(system.name, []).append(seconds)
    if scenario.writes and mounted.exit_seconds is not None:
        for name in times:
            collector.exits[name].setdefault(system.name, []).append(mounted.exit_seconds)
    return "  ".join(f"{name} {t:.3f}s" for name, t in times.items())


def run(args, command_line: str) -> dict:
    if os.geteuid() != 0:
        raise BenchError("must run as root (it mounts overlayfs and FUSE filesystems)")
    install_requirements(args)
    profile = PROFILES[args.profile]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    layers = ensure_layers(out, profile, args.mirror, log)
    scenarios = [SCENARIOS_BY_NAME[n] for n in args.workloads]
    steps = timed_steps(scenarios)
    collector = Collector(steps)
    with contextlib.ExitStack() as stack:
        reporting = None
        if not args.no_prefault:
            reporting = stack.enter_context(page_reporting_held_off(out / "page_reporting_order"))
            if reporting:
                log(f"free page reporting held off (order {reporting[0]} -> {reporting[1]})")
            log("touching free memory once (first-touch costs in VMs) ...")
            log(f"touched {prefault_memory() >> 30} GiB")
        uring_on = None
        if PyunionUring.name in args.systems:
            uring_on = stack.enter_context(fuse_uring_enabled(out / "enable_uring"))
            log("FUSE over io_uring " + ("enabled for the run" if uring_on else
                                         "not available: pyunion -o uring serves /dev/fuse"))
        log("warming the page cache ...")
        warm_page_cache(layers.root)
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        load_before = os.getloadavg()[0]
        with Scratch(out, log) as scratch:
            for rep in range(args.reps):
                for index, scenario in enumerate(scenarios):
                    shift = (rep + index) % len(args.systems)
                    for name in args.systems[shift:] + args.systems[:shift]:  # interleaved, rotating
                        only = SYSTEMS[name].workloads
                        if only is not None and scenario.name not in only:
                            continue
                        line = run_scenario(scenario, SYSTEMS[name], layers, scratch, collector)
                        log(f"[{rep + 1}/{args.reps}] {scenario.name:<13} {name:<14} {line}")
            where = "a fresh ext4 filesystem made for this run (see bench/scratch.py)" \
                if scratch.on_image else "a directory on the layers' filesystem (no loop device)"
    summary = report.summarize(collector.samples, collector.errors, collector.memory, steps,
                               args.systems, collector.cpu, collector.exits)
    return {
        "command": command_line,
        "started": started,
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "profile": profile.name,
        "reps": args.reps,
        "systems": args.systems,
        "machine": report.machine(),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "scratch": where,
        "page_reporting": None if reporting is None else
        f"free page reporting to the hypervisor held off during the run (its order raised from "
        f"{reporting[0]} to {reporting[1]}, then put back), after free memory was touched once",
        "fuse_uring": None if uring_on is None else
        f"FUSE over io_uring ({FUSE_URING}) "
        + ("set to Y during the run, then put back" if uring_on else "not available"),
        "summary": summary,
        "warnings": collector.warnings,
    }


def publish(args, data: dict) -> None:
    """Print the table; save JSON, chart and report under --out (and bench/ with --record)."""
    out = args.out.resolve()
    summary = data["summary"]
    print(report.format_table(summary, args.systems), end="")
    cpu_table = report.format_cpu_table(summary, args.systems)
    if cpu_table:
        print("\nFUSE daemon CPU seconds (median):\n" + cpu_table, end="")
    exit_table = report.format_cpu_table(summary, args.systems, "daemon_exit")
    if exit_table:
        print("\nSeconds from unmount to FUSE daemon exit (median):\n" + exit_table, end="")
    errors = report.format_errors(summary)
    if errors:
        print("\nFailed runs:\n" + errors, end="")
    for warning in data["warnings"]:
        print(f"warning: {warning}")
    missed = report.misses(summary)
    if missed:
        print("\npyunion misses: " + "; ".join(missed))
    report.save_json(out / "results.json", data)
    chart = None
    if not args.no_chart:
        chart = out / "results.png"
        report.draw_chart(summary, args.systems, chart)
    (out / "RESULTS.md").write_text(report.results_markdown(data, args.systems, chart and chart.name))
    log(f"saved {out / 'results.json'}" + (f" and {chart}" if chart else ""))
    if args.record:
        bench_dir = ROOT / "bench"
        if chart:
            shutil.copyfile(chart, bench_dir / "results.png")
        report.save_json(bench_dir / "results.json", data)
        (bench_dir / "RESULTS.md").write_text(
            report.results_markdown(data, args.systems, "results.png" if chart else None))
        log(f"recorded {bench_dir / 'RESULTS.md'}")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command_line = " ".join([".venv/bin/python -m bench", *map(shlex.quote, argv)])
    signal.signal(signal.SIGTERM, _interrupt)  # (so that what the run changed is put back)
    try:
        args = parse_args(argv)
        data = run(args, command_line)
        publish(args, data)
    except (BenchError, LayerError) as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2 if isinstance(e, BenchError) else 1
    except KeyboardInterrupt:
        return 130
    failed = any(s["errors"] for s in data["summary"]["steps"].values())
    return 1 if failed else 0
