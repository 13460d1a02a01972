"""The workloads: shell commands timed on a fresh mount of each system, with their targets.

A scenario is what runs on one fresh mount; it has one or more steps. A step with `timed=False`
primes the kernel's caches for the step after it. Commands see the merged tree as $MNT.
"""

import os
import sqlite3
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.layers import APP_TREE, BASE_TREE, BIG_DIR, BIG_FILE, Layers

CACHED, COLD, SEQUENTIAL = 1.0, 1.5, 1.2  # pyunion / fuse-overlayfs targets

STAT_ALL = "find \"$MNT\" -printf '%s %m %n\\n' > /dev/null"
LS_LR = 'ls -lR "$MNT/usr" "$MNT/etc" > /dev/null'
READ_ALL = "tar cf - -C \"$MNT\" --exclude=./srv/big . | cat > /dev/null"
GREP = f"grep -r 'def __init__' \"$MNT/{APP_TREE}\" | cat > /dev/null"
# dpkg inside the tree, as in a container (it fsyncs every file it unpacks there; the host's
# `dpkg --root` does not); the host's for a tree without one (the tiny profile's busybox base)
PKG_COPY = 'mkdir "$MNT/tmp/debs" && cp "$DEBS"/*.deb "$MNT/tmp/debs/"'
PKG_INSTALL = (
    'if [ -x "$MNT/usr/bin/dpkg" ]; then chroot "$MNT" sh -c "dpkg --force-depends -i /tmp/debs/*.deb"; '
    'else dpkg --root="$MNT" --force-depends -i "$MNT"/tmp/debs/*.deb; fi'
)
COMMITS = '"$PYTHON" "$COMMITS" "$MNT/tmp/bench.sqlite" "$COMMIT_COUNT"'
CHOWN = f'chown -R 1000:1000 "$MNT/{APP_TREE}"'
EXEC_LOOP = (
    "chroot \"$MNT\" /bin/sh -c "
    "'i=0; while [ $i -lt \"$1\" ]; do /bin/true; i=$((i+1)); done' sh \"$EXEC_COUNT\""
)


@dataclass(frozen=True)
class Step:
    name: str
    command: str
    target: float | None = None  # None: not timed, it only warms the caches
    note: str = ""

    @property
    def timed(self) -> bool:
        return self.target is not None


@dataclass(frozen=True)
class Scenario:
    name: str
    steps: tuple[Step, ...]
    writes: bool = False  # needs a private copy for the native system
    private: tuple[str, ...] = ()  # files the native system must not share (changed in place)
    check: Callable[[Path, Layers], str | None] | None = None  # verifies the result
    memory: bool = False  # record the daemon's peak memory after this scenario


def _check_append(mnt: Path, layers: Layers) -> str | None:
    size = os.stat(mnt / BIG_FILE).st_size
    return None if size == layers.big_size + 1 else f"{BIG_FILE} has {size} bytes after the append"


def _check_unpack(mnt: Path, layers: Layers) -> str | None:
    count = sum(len(files) for _, _, files in os.walk(mnt / "tmp/unpacked"))
    wanted = layers.profile.tar_files
    return None if count == wanted else f"unpacked {count} files, wanted {wanted}"


def _check_removed(mnt: Path, layers: Layers) -> str | None:
    left = [p for p in (BASE_TREE, APP_TREE) if os.path.lexists(mnt / p)]
    return f"{left[0]} still exists after rm -rf" if left else None


def _check_installed(mnt: Path, layers: Layers) -> str | None:
    stanzas = (mnt / "var/lib/dpkg/status").read_text().split("\n\n")
    installed = {line.split(": ", 1)[1] for stanza in stanzas if "\nStatus: install ok installed" in stanza
                 for line in stanza.splitlines() if line.startswith("Package: ")}
    missing = [p for p in layers.profile.packages if p not in installed]
    return f"{missing[0]} is not installed" if missing else None


def _check_commits(mnt: Path, layers: Layers) -> str | None:
    db = sqlite3.connect(mnt / "tmp/bench.sqlite")
    try:
        count = db.execute("SELECT count(*) FROM row").fetchone()[0]
    finally:
        db.close()
    wanted = layers.profile.commits
    return None if count == wanted else f"the database has {count} rows, wanted {wanted}"


def _check_owned(mnt: Path, layers: Layers) -> str | None:
    count = 0
    for parent, dirs, files in os.walk(mnt / APP_TREE):
        for name in [*dirs, *files]:
            path = os.path.join(parent, name)
            if os.lstat(path).st_uid != 1000:
                return f"{path} is not owned by 1000 after chown -R"
        for name in files:  # (a sample: the data is the layer's still)
            count += 1
            path = Path(parent, name)
            if count % 20 == 0 and not path.is_symlink():
                below = layers.app / path.relative_to(mnt)
                if path.read_bytes() != below.read_bytes():
                    return f"{path} does not hold its data after chown -R"
    return None


def _check_big_dir(mnt: Path, layers: Layers) -> str | None:
    count = len(os.listdir(mnt / BIG_DIR))
    wanted = layers.profile.many
    return None if count == wanted else f"{BIG_DIR} lists {count} entries, wanted {wanted}"


SCENARIOS = (
    Scenario(
        "stat",
        (
            Step("stat_cold", STAT_ALL, COLD, "find -printf '%s %m %n' of the whole tree, fresh mount"),
            Step("stat_warm", STAT_ALL, CACHED, "the same again on the same mount"),
        ),
        memory=True,
    ),
    Scenario(
        "ls_lR",
        (Step("ls_lR_prime", LS_LR), Step("ls_lR", LS_LR, CACHED, "ls -lR /usr /etc, second pass")),
    ),
    Scenario(
        "read_all",
        (
            Step("read_all", READ_ALL, COLD, "tar cf - every file | cat, fresh mount"),
            Step("read_all_again", READ_ALL, CACHED, "the same again (repeated reads)"),
        ),
    ),
    Scenario(
        "seq_read",
        (Step("seq_read", f'dd if="$MNT/{BIG_FILE}" of=/dev/null bs=1M status=none', SEQUENTIAL,
              "dd of the big lower file, fresh mount"),),
    ),
    Scenario(
        "copy_up",
        (Step("copy_up", f'printf x >> "$MNT/{BIG_FILE}"', COLD, "append one byte to the big file"),),
        writes=True,
        private=(BIG_FILE,),
        check=_check_append,
    ),
    Scenario(
        "unpack",
        (Step("unpack", 'tar xf "$TARBALL" -C "$MNT/tmp"', COLD, "tar xf of many small files"),),
        writes=True,
        check=_check_unpack,
    ),
    Scenario(
        "rm_rf",
        (Step("rm_rf", f'rm -rf "$MNT/{BASE_TREE}" "$MNT/{APP_TREE}"', COLD,
              f"rm -rf /{BASE_TREE} (base) and /{APP_TREE} (app)"),),
        writes=True,
        check=_check_removed,
    ),
    Scenario(
        "pkg_install",
        (Step("pkg_copy", PKG_COPY),
         Step("pkg_install", PKG_INSTALL, COLD,
              "dpkg -i of Debian packages in a chroot (each file written, fsynced, renamed)"),),
        writes=True,
        private=("var/lib/dpkg", "var/log"),
        check=_check_installed,
    ),
    Scenario(
        "commits",
        (Step("commits", COMMITS, COLD, "SQLite transactions, each committed with fsync"),),
        writes=True,
        check=_check_commits,
    ),
    Scenario(
        "chown_r",
        (Step("chown_r", CHOWN, COLD, f"chown -R of /{APP_TREE} (copies every file up)"),),
        writes=True,
        private=(APP_TREE,),
        check=_check_owned,
    ),
    Scenario(
        "grep_r",
        (Step("grep_r_prime", GREP), Step("grep_r", GREP, CACHED, f"grep -r over /{APP_TREE}, second pass")),
    ),
    Scenario(
        "exec",
        (Step("exec_prime", EXEC_LOOP), Step("exec_loop", EXEC_LOOP, CACHED,
                                             "chroot; /bin/true N times, second pass")),
    ),
    Scenario(
        "big_dir",
        (
            Step("big_dir_list", f'ls -f "$MNT/{BIG_DIR}" > /dev/null', COLD,
                 "readdir of the two-layer directory, fresh mount"),
            Step("big_dir_stat", f"find \"$MNT/{BIG_DIR}\" -printf '%s %m %n\\n' > /dev/null", COLD,
                 "stat every entry of it"),
        ),
        check=_check_big_dir,
    ),
    Scenario(
        "parallel_read",
        (Step("parallel_read",
              f'{{ tar cf - -C "$MNT" {BASE_TREE} | cat > /dev/null; }} & a=$!; '
              f'{{ tar cf - -C "$MNT" {APP_TREE} | cat > /dev/null; }} & b=$!; '
              'wait $a && wait $b',
              COLD, f"two readers at once: /{BASE_TREE} and /{APP_TREE}, fresh mount"),),
    ),
)

SCENARIOS_BY_NAME = {s.name: s for s in SCENARIOS}
COMMITS_SCRIPT = Path(__file__).with_name("commits.py")


def timed_steps(scenarios) -> list[Step]:
    return [step for s in scenarios for step in s.steps if step.timed]


def environment(mnt: Path, layers: Layers) -> dict[str, str]:
    return {
        **os.environ,
        "MNT": str(mnt),
        "TARBALL": str(layers.tarball),
        "EXEC_COUNT": str(layers.profile.exec_count),
        "DEBS": str(layers.debs),
        "PYTHON": sys.executable,
        "COMMITS": str(COMMITS_SCRIPT),
        "COMMIT_COUNT": str(layers.profile.commits),
        "LC_ALL": "C",
    }
