"""`pyunion run` on a real Debian minbase root filesystem (debootstrap; skipped when it can't be built).

The minbase tree is built once and kept in /var/tmp/pyunion-test-minbase for later runs.
"""

import hashlib
import os
import shutil
import subprocess
import sys

import pytest

CACHE = "/var/tmp/pyunion-test-minbase"
MIRROR = "http://deb.debian.org/debian"
PYUNION = [sys.executable, "-m", "unionfs"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="debootstrap needs root")


@pytest.fixture(scope="module")
def minbase():
    root = os.path.join(CACHE, "rootfs")
    done = os.path.join(CACHE, "complete")
    if not os.path.exists(done):
        if not shutil.which("debootstrap"):
            pytest.skip("debootstrap is not installed")
        shutil.rmtree(CACHE, ignore_errors=True)
        os.makedirs(CACHE)
        res = subprocess.run(
            ["debootstrap", "--variant=minbase", "bookworm", root, MIRROR],
            capture_output=True,
            timeout=900,
        )
        if res.returncode != 0:
            shutil.rmtree(CACHE, ignore_errors=True)
            pytest.skip("debootstrap could not build a minbase (no mirror reachable?)")
        open(done, "w").close()
    return root


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def run(*args, timeout=300):
    return subprocess.run([*PYUNION, "run", *args], capture_output=True, timeout=timeout)


def test_debian_userland_in_a_container(minbase, tmp_path):
    watched = ["etc/passwd", "etc/group", "usr/bin/dpkg", "var/lib/dpkg/status"]
    before = {p: digest(os.path.join(minbase, p)) for p in watched}
    rw = tmp_path / "rw"
    script = (
        "cat /etc/debian_version >/dev/null && echo debian;"
        " useradd -m -u 4321 alice && su alice -s /bin/sh -c 'id -un; echo $HOME' || echo su-failed;"
        " dpkg-query -W -f='${Package}\\n' dpkg; apt-get --version | head -n1 | cut -d' ' -f1;"
        " hostname; cat /proc/1/comm >/dev/null; ls /proc | grep -c '^[0-9]'"
    )
    res = run("--rw", str(rw), "--hostname", "deb", minbase, "--", "bash", "-c", script)
    assert res.returncode == 0, res.stderr
    out = res.stdout.decode().splitlines()
    assert out[0] == "debian"
    assert out[1:3] == ["alice", "/home/alice"]
    assert out[3:6] == ["dpkg", "apt", "deb"]
    assert int(out[6]) <= 4  # pid 1, bash, ls, grep: nothing from the host
    with open(rw / "etc/passwd") as f:
        assert any(line.startswith("alice:x:4321:") for line in f)
    assert os.path.isdir(rw / "home/alice")
    assert not os.path.exists(rw / "etc/hostname")
    assert {p: digest(os.path.join(minbase, p)) for p in watched} == before
    res = run("--rw", str(rw), "-u", "alice", minbase, "--", "sh", "-c", "id -un; echo $HOME")
    assert res.stdout.decode().splitlines() == ["alice", "/home/alice"]
