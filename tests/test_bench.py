"""Smoke test of the benchmark harness: a tiny data set, native and pyunion, one repetition."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.layers import APP_TREE, BIG_DIR, BIG_FILE, PROFILES
from bench.workloads import SCENARIOS, timed_steps

ROOT = Path(__file__).resolve().parent.parent
TINY = PROFILES["tiny"]


def mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p.startswith(prefix)]


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture
def out(tmp_path):
    yield tmp_path
    for point in reversed(mounts_under(tmp_path)):  # only if the harness failed to clean up
        subprocess.run(["umount", "-l", point], check=False)


def test_tiny_run_times_every_workload_on_native_and_pyunion(out):
    done = run_bench("--profile", "tiny", "--systems", "native,pyunion,pyunion-metacopy", "--reps", "1",
                     "--out", str(out), "--no-install", "--no-chart", "--no-prefault")
    assert done.returncode == 0, done.stderr
    assert mounts_under(out) == []

    data = json.loads((out / "results.json").read_text())
    steps = data["summary"]["steps"]
    writing = {step.name for scenario in SCENARIOS if scenario.writes for step in scenario.steps
               if step.timed}
    assert list(steps) == [s.name for s in timed_steps(SCENARIOS)]
    for name, step in steps.items():
        for system in ("native", "pyunion"):
            assert len(step["samples"][system]) == 1, (name, system)
            assert step["samples"][system][0] > 0
        assert step["errors"] == {}
        # only FUSE systems have a daemon; the metacopy variant runs chown -R alone
        variants = {"pyunion", "pyunion-metacopy"} if name == "chown_r" else {"pyunion"}
        assert set(step["daemon_cpu"]) == variants
        assert len(step["samples"]["pyunion-metacopy"]) == (name == "chown_r")
        assert step["daemon_cpu"]["pyunion"] >= 0
        # how long the daemon took to exit after the unmount, for the workloads that write
        assert ("pyunion" in step["daemon_exit"]) == (name in writing), name
    assert data["summary"]["memory_kib"]["pyunion"] > 1024  # a Python daemon holds > 1 MiB

    table = done.stdout
    assert "| workload | native | pyunion | pyunion -o metacopy |" in table
    assert table.count("\n| ") >= len(steps) + 1
    assert "| stat_cold | " in (out / "RESULTS.md").read_text()

    # the cached layers: app overrides base in the merged copy, the big directory is merged
    layers = out / "layers" / "tiny"
    assert len(os.listdir(layers / "native" / BIG_DIR)) == TINY.many
    assert os.path.getsize(layers / "app" / BIG_FILE) == TINY.big_mib << 20
    assert os.path.getsize(layers / "native" / BIG_FILE) == TINY.big_mib << 20  # append undone
    override = (layers / "native/etc/issue").read_bytes()
    assert override.startswith(b"overridden by the app layer\n")
    assert (layers / "base/etc/issue").read_bytes() == b"tiny base\n"
    assert (layers / "native" / APP_TREE).is_dir()
    # the native system changed private copies of what the workloads change in place
    # (chown -R, dpkg's database): the cached tree is as built
    native_app = layers / "native" / APP_TREE
    assert all(os.lstat(os.path.join(d, n)).st_uid == 0
               for d, dirs, files in os.walk(native_app) for n in dirs + files)
    assert (layers / "native/var/lib/dpkg/status").read_text() == ""
    # every writable layer, mountpoint and the run's scratch filesystem are gone
    assert not (out / "scratch").exists() and not (out / "scratch.img").exists()
    assert not (out / "farm").exists()
    if os.path.exists("/dev/loop-control"):  # writable layers on a filesystem made for the run
        assert data["scratch"].startswith("a fresh ext4 filesystem"), data["scratch"]


def test_bad_option_is_one_line_and_touches_nothing(out):
    done = run_bench("--systems", "native,nfs", "--out", str(out / "never"))
    assert done.returncode == 2
    assert done.stderr == ("bench: unknown system 'nfs' (choose from native, overlayfs, "
                           "fuse-overlayfs, unionfs-fuse, pyunion, pyunion-metacopy, pyunion-lowlatency, "
                           "pyunion-uring, pyunion-nocolocate)\n")
    assert not (out / "never").exists()

    done = run_bench("--reps", "0", "--out", str(out / "never"))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "--reps" in done.stderr
    assert not (out / "never").exists()


@pytest.mark.skipif(not os.path.exists("/dev/loop-control"), reason="needs loop devices")
def test_a_killed_runs_scratch_filesystem_is_dropped_by_the_next_run(out):
    """What a killed run leaves (its scratch image on a loop device, mounted, a layer tree in
    it) is unmounted, detached and deleted by the next run, which then cleans up after itself."""
    image, root = out / "scratch.img", out / "scratch"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    device = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True,
                            text=True, check=True).stdout.strip()
    try:
        root.mkdir()
        subprocess.run(["mount", device, str(root)], check=True)
        (root / "pyunion-0" / "upper").mkdir(parents=True)
        done = run_bench("--profile", "tiny", "--systems", "native", "--workloads", "stat",
                         "--reps", "1", "--out", str(out), "--no-install", "--no-chart",
                         "--no-prefault")
        assert done.returncode == 0, done.stderr
        assert "no fresh filesystem" not in done.stderr
        assert mounts_under(out) == []
        assert not image.exists() and not root.exists()
        held = subprocess.run(["losetup", "--noheadings", "--output", "BACK-FILE", device],
                              capture_output=True, text=True).stdout
        assert str(image) not in held, f"{device} still holds the old image"
    finally:
        subprocess.run(["losetup", "--detach", device], capture_output=True)


def test_free_page_reporting_is_held_off_while_measuring_and_put_back(tmp_path):
    """The run stops the kernel from handing freed memory to the hypervisor (whose next use
    would pay first-touch faults again) with the largest reporting order the kernel takes,
    and puts the old order back afterwards: also when the run fails, and, from the order it
    saved, at the next run after one that was killed."""
    from bench.run import PAGE_REPORTING_ORDER, page_reporting_held_off

    if not PAGE_REPORTING_ORDER.exists():
        pytest.skip("this kernel has no free page reporting")
    old = int(PAGE_REPORTING_ORDER.read_text())
    saved = tmp_path / "page_reporting_order"
    try:
        with pytest.raises(RuntimeError), page_reporting_held_off(saved) as held:
            assert held is not None and held[0] == old and int(saved.read_text()) == old
            now = int(PAGE_REPORTING_ORDER.read_text())
            assert now == held[1] and now > old
            with pytest.raises(OSError):  # the largest the kernel takes
                PAGE_REPORTING_ORDER.write_text(f"{now + 1}\n")
            raise RuntimeError("a failed run")
        assert int(PAGE_REPORTING_ORDER.read_text()) == old and not saved.exists()
        # a killed run left the order raised, and what it was saved
        saved.write_text(f"{old}\n")
        PAGE_REPORTING_ORDER.write_text(f"{now}\n")
        with page_reporting_held_off(saved) as held:
            assert held == (old, now)
        assert int(PAGE_REPORTING_ORDER.read_text()) == old and not saved.exists()
    finally:
        PAGE_REPORTING_ORDER.write_text(f"{old}\n")
