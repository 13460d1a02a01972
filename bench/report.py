"""Turning samples into results: medians, ratios to fuse-overlayfs, the table, JSON and the chart."""

import json
import os
import platform
import statistics
import subprocess
from pathlib import Path

from bench.systems import REFERENCE, SYSTEMS

SUBJECT = "pyunion"
SLOWEST_PEER = "unionfs-fuse"


def summarize(samples: dict, errors: dict, memory: dict, steps: list, systems: list[str],
              cpu: dict | None = None, exits: dict | None = None) -> dict:
    """Medians and ratios per step; a step's ratio is system median / fuse-overlayfs median.

    `cpu` holds the FUSE daemons' CPU seconds per step, `exits` the seconds from their
    unmount to their exit after steps that write; both summarized as medians too.
    """
    cpu = cpu or {}
    exits = exits or {}
    result = {"steps": {}, "memory_kib": {}}
    for step in steps:
        medians = {
            name: statistics.median(samples[step.name][name])
            for name in systems
            if samples[step.name].get(name)
        }
        reference = medians.get(REFERENCE)
        ratios = {name: m / reference for name, m in medians.items()} if reference else {}
        verdict = {}
        if SUBJECT in ratios:
            verdict["target"] = "ok" if ratios[SUBJECT] <= step.target else "MISS"
        if SUBJECT in medians and SLOWEST_PEER in medians:
            verdict["vs_unionfs_fuse"] = "ok" if medians[SUBJECT] <= medians[SLOWEST_PEER] else "MISS"
        result["steps"][step.name] = {
            "note": step.note,
            "target": step.target,
            "samples": {name: samples[step.name].get(name, []) for name in systems},
            "median": medians,
            "ratio": ratios,
            "errors": {name: errs for name, errs in errors.get(step.name, {}).items() if errs},
            "daemon_cpu": {name: statistics.median(v) for name, v in cpu.get(step.name, {}).items()
                           if v and name in systems},
            "daemon_exit": {name: statistics.median(v) for name, v in exits.get(step.name, {}).items()
                            if v and name in systems},
            "verdict": verdict,
        }
    for name, values in memory.items():
        if values:
            result["memory_kib"][name] = int(statistics.median(values))
    return result


def format_table(summary: dict, systems: list[str]) -> str:
    """A Markdown table: median seconds and (ratio to fuse-overlayfs), and pyunion's verdicts."""
    heads = ["workload", *(SYSTEMS[s].label for s in systems)]
    with_subject = SUBJECT in systems
    if with_subject:
        heads += ["pyunion target", "pyunion ≤ unionfs-fuse"]
    rows = [heads, ["---"] * len(heads)]
    for name, step in summary["steps"].items():
        row = [name]
        for system in systems:
            if system in step["errors"] and system not in step["median"]:
                row.append("FAIL")
                continue
            median = step["median"].get(system)
            ratio = step["ratio"].get(system)
            cell = "-" if median is None else f"{median:.3f} s"
            if ratio is not None:
                cell += f" ({ratio:.2f})"
            if system in step["errors"]:
                cell += " !"
            row.append(cell)
        if with_subject:
            verdict = step["verdict"]
            row.append(f"≤ {step['target']}: {verdict['target']}" if "target" in verdict else "-")
            row.append(verdict.get("vs_unionfs_fuse", "-"))
        rows.append(row)
    memory = summary["memory_kib"]
    if memory:
        row = ["daemon peak memory (stat)"]
        for system in systems:
            row.append(f"{memory[system] / 1024:.1f} MiB" if system in memory else "-")
        if with_subject:
            row += ["", ""]
        rows.append(row)
    return "\n".join("| " + " | ".join(r) + " |" for r in rows) + "\n"


def format_cpu_table(summary: dict, systems: list[str], key: str = "daemon_cpu") -> str:
    """A Markdown table of the FUSE daemons' median CPU seconds per workload ("" if none);
    KEY "daemon_exit": their seconds from unmount to exit, for the workloads that have them."""
    steps = {name: st.get(key, {}) for name, st in summary["steps"].items() if st.get(key)}
    daemons = [s for s in systems if any(s in values for values in steps.values())]
    if not daemons:
        return ""
    rows = [["workload", *(SYSTEMS[s].label for s in daemons)], ["---"] * (len(daemons) + 1)]
    for name, values in steps.items():
        rows.append([name, *(f"{values[s]:.2f}" if s in values else "-" for s in daemons)])
    return "\n".join("| " + " | ".join(r) + " |" for r in rows) + "\n"


def format_errors(summary: dict) -> str:
    lines = []
    for name, step in summary["steps"].items():
        for system, errs in step["errors"].items():
            lines.append(f"- {name} on {system}: {len(errs)} failed run(s), first: {errs[0]}")
    return "\n".join(lines) + ("\n" if lines else "")


def misses(summary: dict) -> list[str]:
    """One line per workload where pyunion misses its target or is slower than unionfs-fuse."""
    out = []
    for name, step in summary["steps"].items():
        verdict, why = step["verdict"], []
        if verdict.get("target") == "MISS":
            why.append(f"{step['ratio'][SUBJECT]:.2f} × fuse-overlayfs > {step['target']}")
        if verdict.get("vs_unionfs_fuse") == "MISS":
            why.append("slower than unionfs-fuse")
        if why:
            out.append(f"{name}: {', '.join(why)}")
    return out


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0] if text else "?"


def _package_version(package: str) -> str:
    version = _first_line(["dpkg-query", "-W", "-f=${Version}", package])
    return version if version[:1].isdigit() else "not installed"


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    root = Path(__file__).resolve().parent.parent
    commit = _first_line(["git", "-C", str(root), "rev-parse", "--short", "HEAD"])
    try:
        debian = Path("/etc/debian_version").read_text().strip()
    except OSError:
        debian = "?"
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gib": round(mem / 2**30, 1),
        "kernel": platform.release(),
        "debian": debian,
        "python": platform.python_version(),
        "pyunion_commit": commit,
        "fuse-overlayfs": _package_version("fuse-overlayfs"),
        "unionfs-fuse": _package_version("unionfs-fuse"),
        "cpuidle": _cpuidle(),
    }


def _cpuidle() -> str:
    """How idle CPUs wait: the cpuidle driver, and for haltpoll how long they poll before
    halting (0 in a VM: each wake-up of a waiting client then costs a halt's exit)."""
    base = Path("/sys/devices/system/cpu/cpuidle")
    try:
        driver = (base / "current_driver").read_text().strip()
    except OSError:
        return "?"
    try:
        poll = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns").read_text().strip()
    except OSError:
        return driver
    return f"{driver}, guest_halt_poll_ns {poll}"


def save_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")


def draw_chart(summary: dict, systems: list[str], path: Path) -> None:
    """Grouped bars of each system's ratio to fuse-overlayfs per workload (log scale), with targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, s in summary["steps"].items() if s["ratio"]]
    shown = [s for s in systems if any(s in summary["steps"][n]["ratio"] for n in names)]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(names) + 2), 5.5))
    width = 0.8 / max(1, len(shown))
    for i, system in enumerate(shown):
        xs = [k + (i - (len(shown) - 1) / 2) * width for k in range(len(names))]
        ys = [summary["steps"][n]["ratio"].get(system, float("nan")) for n in names]
        ax.bar(xs, ys, width, label=SYSTEMS[system].label)
    for k, n in enumerate(names):
        target = summary["steps"][n]["target"]
        ax.plot([k - 0.45, k + 0.45], [target, target], color="black", linestyle=":", linewidth=1.5,
                zorder=3)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=35, ha="right")
    ax.set_ylabel("median time / fuse-overlayfs (log scale)")
    ax.set_title("Time relative to fuse-overlayfs (lower is faster; dotted: pyunion target)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def results_markdown(data: dict, systems: list[str], chart_name: str | None) -> str:
    """The text of bench/RESULTS.md for one run."""
    summary = data["summary"]
    m = data["machine"]
    lines = [
        "# Benchmark results",
        "",
        f"Produced by `{data['command']}` on {data['finished']} "
        f"(profile `{data['profile']}`, {data['reps']} repetitions, systems interleaved, "
        "each repetition on a fresh mount with the layers in the page cache).",
        "",
        "Cells: median seconds and, in parentheses, the ratio to fuse-overlayfs. "
        "`!` marks a system with failed runs (listed below).",
        "",
        format_table(summary, systems),
    ]
    cpu_table = format_cpu_table(summary, systems)
    if cpu_table:
        lines += ["CPU seconds used by each FUSE daemon during the timed command (median; less "
                  "sensitive than wall time to other load on the machine):", "", cpu_table]
    exit_table = format_cpu_table(summary, systems, "daemon_exit")
    if exit_table:
        lines += ["Seconds from the unmount to each FUSE daemon's exit after the workloads that "
                  "write (median): work a daemon left for after the timed command, such as "
                  "pyunion's filling of metadata-only copies (see unionfs/filler.py):", "",
                  exit_table]
    errors = format_errors(summary)
    if errors:
        lines += ["Failed runs:", "", errors]
    if data.get("warnings"):
        lines += ["Warnings (measurements kept):", "", *(f"- {w}" for w in data["warnings"]), ""]
    missed = misses(summary)
    if missed:
        lines += ["pyunion misses:", "", *(f"- {x}" for x in missed), ""]
    if chart_name:
        lines += [f"![ratios to fuse-overlayfs]({chart_name})", ""]
    lines += [
        "Machine:",
        "",
        f"- CPU: {m['cpu']} ({m['cpus']} CPUs), {m['memory_gib']} GiB RAM",
        f"- kernel {m['kernel']}, Debian {m['debian']}, Python {m['python']}",
        f"- fuse-overlayfs {m['fuse-overlayfs']}, unionfs-fuse {m['unionfs-fuse']} (Debian packages); "
        f"pyunion at commit {m['pyunion_commit']}",
    ]
    if m.get("cpuidle"):
        lines.append(f"- idle CPUs: cpuidle driver {m['cpuidle']}")
    if "scratch" in data:
        lines.append(f"- writable layers on: {data['scratch']}")
    if data.get("page_reporting"):
        lines.append(f"- memory: {data['page_reporting']}")
    if data.get("fuse_uring"):
        lines.append(f"- {data['fuse_uring']}")
    if "load_average" in data:
        lines.append(f"- 1-minute load average before / after the run: {data['load_average'][0]} / "
                     f"{data['load_average'][1]} (anything else running on the machine adds noise)")
    lines += [
        "",
        "Workloads (target: the largest pyunion / fuse-overlayfs median ratio allowed):",
        "",
        *(f"- `{n}` (≤ {s['target']}): {s['note']}" for n, s in summary["steps"].items()),
        "",
        "Targets come from issue 5: 1.0 for what the kernel's caches can serve (second passes, "
        "grep, exec), 1.5 for cold metadata and writes, 1.2 for the big sequential read, and never "
        "slower than unionfs-fuse. The issue names no target for `big_dir_*`, `parallel_read` and "
        "the three workloads added later (`pkg_install`, `commits`, `chown_r`); they get the cold "
        "one (1.5).",
        "",
    ]
    return "\n".join(lines)
