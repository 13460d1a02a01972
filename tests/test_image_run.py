"""Images through `pyunion run`: the config is honoured, named containers are kept, diffed, committed."""

import os
import subprocess

import pytest
from test_image_builders import (
    PYUNION,
    config_for,
    inspect,
    pyunion,
    three_layers,
    write_docker_save,
)


@pytest.fixture
def home(tmp_path):
    layers = three_layers()
    config = config_for(
        layers,
        Entrypoint=["/bin/busybox", "sh", "-c"],
        Cmd=["echo cmd=$GREETING; pwd; /bin/busybox id -u; /bin/busybox id -g"],
        Env=["PATH=/bin", "GREETING=hello"],
        WorkingDir="/home/user",
        User="1234:99",
    )
    archive = str(tmp_path / "img.tar")
    write_docker_save(archive, [(layers, config, ["busy:1"])])
    h = str(tmp_path / "store")
    pyunion("image", "import", archive, home=h)
    yield h
    # a container that outlived a failed test must not keep its mount
    with open("/proc/self/mountinfo") as f:
        stale = [line.split()[4] for line in f if h in line.split()[4]]
    for mnt in stale:
        subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)


def run(home: str, *args: str) -> str:
    env = dict(os.environ, PYUNION_HOME=home)
    proc = subprocess.run([*PYUNION, "run", *args], env=env, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def test_run_honours_image_config(home):
    assert run(home, "busy:1") == "cmd=hello\n/home/user\n1234\n99\n"
    # CMD after -- replaces Cmd but keeps the Entrypoint
    assert run(home, "busy:1", "--", "echo override $GREETING") == "override hello\n"


def test_named_container_is_kept_diffed_and_committed(home):
    run(
        home,
        "--name",
        "keep",
        "-u",
        "0",
        "busy:1",
        "--",
        "echo made > /home/user/made; rm /etc/motd",
    )
    ps = pyunion("ps", home=home).stdout.decode().splitlines()
    assert [line.split()[:2] for line in ps[1:]] == [["keep", "busy:1"]]
    diff = pyunion("diff", "keep", home=home).stdout.decode()
    assert diff == "C /etc\nD /etc/motd\nC /home\nC /home/user\nA /home/user/made\n"
    # the kept layer is reused by the next run of the same name
    assert run(home, "--name", "keep", "-u", "0", "busy:1", "--", "cat /home/user/made") == "made\n"
    pyunion("commit", "keep", "busy:2", home=home)
    assert len(inspect(home, "busy:2")["RootFS"]["Layers"]) == 4
    out = run(home, "busy:2", "--", "cat /home/user/made; ls /etc")
    lines = out.splitlines()
    assert lines[0] == "made" and "passwd" in lines[1:] and "motd" not in lines[1:]
    pyunion("rm", "keep", home=home)
    assert not os.path.exists(os.path.join(home, "containers", "keep"))


def test_commit_gives_metadata_only_copies_their_data(home):
    """A container's chmod/chown copy no data up (its layer is mounted with -o metacopy); a
    commit takes their data from the image's layers, so the new layer holds whole files."""
    # (the append goes into a.txt's copy as it is: its tail, see unionfs.metacopy)
    script = "chmod 600 /home/user/a.txt; chown 5:5 /bin/busybox; echo more >> /home/user/a.txt"
    run(home, "--name", "meta", "-u", "0", "busy:1", "--", script)
    upper = os.path.join(home, "containers", "meta", "upper")
    for rel, size in (("home/user/a.txt", 19), ("bin/busybox", os.path.getsize("/bin/busybox"))):
        st = os.lstat(os.path.join(upper, rel))
        assert st.st_size == size and st.st_blocks * 512 <= 4096, rel
        assert os.getxattr(os.path.join(upper, rel), "user.pyunion.metacopy") == rel.encode()
    pyunion("commit", "meta", "busy:meta", home=home)
    layer = inspect(home, "busy:meta")["RootFS"]["Layers"][3]
    tree = os.path.join(home, "layers", layer[7:], "tree")
    with open(os.path.join(tree, "home/user/a.txt"), "rb") as f:
        assert f.read() == b"a from middle\nmore\n"
    with open("/bin/busybox", "rb") as a, open(os.path.join(tree, "bin/busybox"), "rb") as b:
        assert a.read() == b.read()
    assert os.stat(os.path.join(tree, "bin/busybox")).st_uid == 5
    assert "user.pyunion.metacopy" not in os.listxattr(os.path.join(tree, "bin/busybox"))
    # the new image's busybox (from the new layer) runs, and the file reads as before
    out = run(home, "-u", "0", "busy:meta", "--", "cat /home/user/a.txt; stat -c %a /home/user/a.txt")
    assert out == "a from middle\nmore\n600\n"
