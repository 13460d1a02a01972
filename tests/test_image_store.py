"""Store robustness: concurrent imports, stale staging from interrupted commands, progress bars."""

import os
import pty
import stat
import subprocess

import pytest
from test_image_builders import (
    PYUNION,
    as_nobody,
    busybox_layer,
    config_for,
    inspect,
    layer_tar,
    pyunion,
    sha,
    write_docker_save,
)

from unionfs import cli


@pytest.fixture
def home(tmp_path):
    return str(tmp_path / "store")


def test_concurrent_imports_share_layers_without_damage(tmp_path, home):
    base = busybox_layer()
    procs = []
    expected = {}
    for i in range(4):
        layers = [base, layer_tar([("file", f"own{i}", f"{i}\n")])]
        archive = str(tmp_path / f"img{i}.tar")
        write_docker_save(archive, [(layers, config_for(layers), [f"img{i}:1"])])
        expected[f"img{i}:1"] = [sha(x) for x in layers]
        env = dict(os.environ, PYUNION_HOME=home)
        procs.append(
            subprocess.Popen(
                [*PYUNION, "image", "import", archive], env=env, stderr=subprocess.PIPE
            )
        )
    results = [(p.communicate(timeout=120)[1], p.returncode) for p in procs]
    for err, code in results:
        assert code == 0, err.decode()
    for name, diff_ids in expected.items():
        assert inspect(home, name)["RootFS"]["Layers"] == diff_ids
    assert sorted(os.listdir(os.path.join(home, "layers"))) == sorted(
        {d[7:] for v in expected.values() for d in v}
    )
    assert os.listdir(os.path.join(home, "tmp")) == []


def test_interrupted_leftovers_are_swept_and_never_visible(tmp_path, home):
    layers = [busybox_layer()]
    archive = str(tmp_path / "img.tar")
    write_docker_save(archive, [(layers, config_for(layers), ["img:1"])])
    # what a killed import leaves: a half-written layer in the staging area
    stale = os.path.join(home, "tmp", "l-killed")
    os.makedirs(os.path.join(stale, "tree", "bin"))
    with open(os.path.join(stale, "layer.tar"), "wb") as f:
        f.write(b"partial")
    assert pyunion("image", "ls", "-q", home=home).stdout == b""
    pyunion("image", "import", archive, home=home)
    assert os.listdir(os.path.join(home, "tmp")) == []
    assert os.listdir(os.path.join(home, "layers")) == [sha(layers[0])[7:]]


def run_with_tty_stderr(args: list[str], home: str) -> tuple[int, bytes]:
    master, slave = pty.openpty()
    env = dict(os.environ, PYUNION_HOME=home)
    proc = subprocess.Popen([*PYUNION, *args], env=env, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    output = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        output += chunk
    os.close(master)
    return proc.wait(timeout=120), output


def test_progress_bar_only_on_a_terminal(tmp_path, home):
    big = layer_tar([("file", "blob", os.urandom(6 << 20))])
    archive = str(tmp_path / "big.tar")
    write_docker_save(archive, [([big], config_for([big]), ["big:1"])])
    quiet = pyunion("image", "import", archive, home=str(tmp_path / "quiet"))
    assert quiet.stderr == b""
    code, output = run_with_tty_stderr(["image", "import", archive], home)
    assert code == 0
    assert b"\rimporting layer 1/1" in output and b"6.0/6.0 MB" in output
    code, output = run_with_tty_stderr(
        ["image", "export", "big:1", str(tmp_path / "out.tar")], home
    )
    assert code == 0 and b"\rexporting big:1" in output


def test_rootless_store_removes_locked_down_directories(shared_dir):
    home = os.path.join(shared_dir, "store")
    layer = layer_tar(
        [
            ("dir", "ro", 0o555),
            ("file", "ro/f", "x"),
            ("dir", "closed", 0o000),
            ("file", "closed/g", "y"),
            ("dir", "ro/in"),
        ]
    )
    archive = os.path.join(shared_dir, "img.tar")
    write_docker_save(archive, [([layer], config_for([layer]), ["locked:1"])])
    os.chmod(archive, 0o644)

    def work() -> int:
        assert cli.main(["image", "import", archive]) == 0
        tree = os.path.join(home, "layers", sha(layer)[7:], "tree")
        assert stat.S_IMODE(os.stat(os.path.join(tree, "closed")).st_mode) == 0
        assert stat.S_IMODE(os.stat(os.path.join(tree, "ro")).st_mode) == 0o555
        return cli.main(["image", "rm", "locked:1"])

    proc = as_nobody(work, home)
    assert proc.returncode == 0, proc.stderr.decode()
    assert (
        os.listdir(os.path.join(home, "layers")) == []
        and os.listdir(os.path.join(home, "tmp")) == []
    )
