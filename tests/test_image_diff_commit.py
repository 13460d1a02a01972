"""diff, commit, ps and rm on named containers whose writable layer is changed through a real mount."""

import json
import os
import shutil
import socket
import stat
import subprocess
import tarfile

import pytest
from test_image_builders import (
    as_nobody,
    config_for,
    inspect,
    mounted,
    one_line_error,
    pyunion,
    sha,
    three_layers,
    write_docker_save,
)

from runner.store import Store
from unionfs import cli
from unionfs.errors import UsageError

EXPECTED_DIFF = """\
C /bin
D /bin/cat
C /data
D /data/new
A /data/z
C /etc
D /etc/motd
A /etc/motd2
C /home
C /home/user
C /home/user/a.txt
D /home/user/c.txt
A /home/user/new.txt
A /newdir
A /newdir/sub
A /newdir/sub/q
C /tmp
"""


@pytest.fixture
def home(tmp_path):
    layers = three_layers()
    archive = str(tmp_path / "img.tar")
    write_docker_save(
        archive,
        [(layers, config_for(layers, Cmd=["/bin/sh"], WorkingDir="/home/user"), ["busy:1"])],
    )
    h = str(tmp_path / "store")
    pyunion("image", "import", archive, home=h)
    return h


def change_through_mount(mnt: str) -> None:
    """The changes a container makes: add, modify, delete, replace a dir, runner-generated files."""
    with open(os.path.join(mnt, "home/user/new.txt"), "w") as f:
        f.write("new\n")
    with open(os.path.join(mnt, "home/user/a.txt"), "a") as f:
        f.write("more\n")
    os.unlink(os.path.join(mnt, "home/user/c.txt"))
    shutil.rmtree(os.path.join(mnt, "data"))
    os.mkdir(os.path.join(mnt, "data"))
    with open(os.path.join(mnt, "data/z"), "w") as f:
        f.write("z\n")
    os.makedirs(os.path.join(mnt, "newdir/sub"))
    with open(os.path.join(mnt, "newdir/sub/q"), "w") as f:
        f.write("q\n")
    os.unlink(os.path.join(mnt, "bin/cat"))
    os.rename(os.path.join(mnt, "etc/motd"), os.path.join(mnt, "etc/motd2"))
    os.chmod(os.path.join(mnt, "tmp"), 0o700)
    for generated in ("etc/hostname", "etc/hosts", "etc/resolv.conf"):
        with open(os.path.join(mnt, generated), "w") as f:
            f.write("generated\n")


def visible_tree(root: str) -> dict[str, bytes | str | None]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = "-> " + os.readlink(p)
            elif os.path.isfile(p):
                out[rel] = open(p, "rb").read()
            else:
                out[rel] = oct(os.lstat(p).st_mode)
    return out


def test_diff_commit_round_trip(tmp_path, home):
    store = Store(home)
    upper = store.prepare_container("c1", "busy:1")
    assert upper == os.path.join(home, "containers", "c1", "upper") and os.listdir(upper) == []
    assert store.prepare_container("c1", "busy:1") == upper
    image = store.resolve_image("busy:1")
    with mounted(upper, image.layer_dirs, str(tmp_path / "mnt")) as mnt:
        change_through_mount(mnt)
        # while mounted, rm refuses (the union's work area is present) and ps lists it
        line = one_line_error(pyunion("rm", "c1", home=home, check=False))
        assert "in use" in line
        before = visible_tree(mnt)
    ps = pyunion("ps", home=home).stdout.decode().splitlines()
    assert ps[0].split() == ["NAME", "IMAGE", "CREATED"] and ps[1].split()[:2] == ["c1", "busy:1"]

    assert pyunion("diff", "c1", home=home).stdout.decode() == EXPECTED_DIFF
    # the same directory named directly finds its container's image
    assert pyunion("diff", upper, home=home).stdout.decode() == EXPECTED_DIFF

    out = pyunion("commit", "c1", "snap:1", home=home).stdout.decode()
    new = inspect(home, "snap:1")
    assert out.strip() == new["Id"]
    old_layers = inspect(home, "busy:1")["RootFS"]["Layers"]
    assert new["RootFS"]["Layers"][:3] == old_layers and len(new["RootFS"]["Layers"]) == 4
    assert new["Config"]["WorkingDir"] == "/home/user"
    diff_id = new["RootFS"]["Layers"][3]
    layer = os.path.join(home, "layers", diff_id[7:])
    with open(os.path.join(layer, "layer.tar"), "rb") as f:
        assert sha(f.read()) == diff_id
    tree = os.path.join(layer, "tree")
    # whiteouts in OCI form, init-layer and union files left out
    assert os.path.isfile(os.path.join(tree, "bin/.wh.cat"))
    assert os.path.isfile(os.path.join(tree, "data/.wh..wh..opq"))
    assert os.path.isfile(os.path.join(tree, "etc/.wh.motd"))
    assert not os.path.exists(os.path.join(tree, ".wh..wh.pyunion"))
    assert sorted(os.listdir(os.path.join(tree, "etc"))) == [".wh.motd", "motd2"]
    assert open(os.path.join(tree, "home/user/a.txt")).read() == "a from middle\nmore\n"

    # a fresh container of the committed image sees what the old one saw (minus generated files)
    upper2 = Store(home).prepare_container("c2", "snap:1")
    with mounted(
        upper2, Store(home).resolve_image("snap:1").layer_dirs, str(tmp_path / "mnt2")
    ) as mnt:
        after = visible_tree(mnt)
    for generated in ("etc/hostname", "etc/hosts", "etc/resolv.conf"):
        del before[generated]
    assert after == before
    assert "bin/cat" not in after and sorted(k for k in after if k.startswith("data/")) == [
        "data/z"
    ]
    assert pyunion("diff", "c2", home=home).stdout == b""

    # committing the same writable layer again gives the same DiffID (deterministic tar)
    pyunion("commit", "c1", "snap:2", home=home)
    assert inspect(home, "snap:2")["RootFS"]["Layers"][3] == diff_id
    assert len(os.listdir(os.path.join(home, "layers"))) == 4

    # images in use by containers are kept; containers go with rm
    line = one_line_error(
        pyunion("image", "rm", inspect(home, "busy:1")["Id"], home=home, check=False)
    )
    assert "used by container c1" in line
    assert pyunion("rm", "c1", "c2", home=home).stdout == b"c1\nc2\n"
    assert not os.path.exists(os.path.join(home, "containers", "c1"))
    assert pyunion("ps", "-q", home=home).stdout == b""


def make_upper(root: str, order: list[str]) -> None:
    """A writable layer with fixed content, created in the given order."""
    actions = {
        "dir": lambda: os.makedirs(os.path.join(root, "srv/app"), exist_ok=True),
        "file": lambda: open(os.path.join(root, "srv/app/run.sh"), "w").write("#!/bin/sh\n"),
        "wh": lambda: open(os.path.join(root, ".wh.var"), "w").close(),
        "link": lambda: os.symlink("app/run.sh", os.path.join(root, "srv/run")),
    }
    os.makedirs(os.path.join(root, "srv"), exist_ok=True)
    for step in order:
        actions[step]()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(
                os.path.join(dirpath, name), (1_700_000_000, 1_700_000_000), follow_symlinks=False
            )
    os.chmod(os.path.join(root, "srv/app/run.sh"), 0o755)


def test_commit_is_deterministic_regardless_of_creation_order(home):
    store = Store(home)
    make_upper(store.prepare_container("x1", "busy:1"), ["dir", "file", "wh", "link"])
    upper2 = store.prepare_container("x2", "busy:1")
    make_upper(upper2, ["wh", "dir", "link", "file"])
    with socket.socket(socket.AF_UNIX) as sock:  # a socket left behind is not part of the layer
        sock.bind(os.path.join(upper2, "srv/app/ctl.sock"))
        os.utime(os.path.join(upper2, "srv/app"), (1_700_000_000, 1_700_000_000))
    pyunion("commit", "x1", "det:1", home=home)
    pyunion("commit", "x2", "det:2", home=home)
    first, second = (
        inspect(home, "det:1")["RootFS"]["Layers"],
        inspect(home, "det:2")["RootFS"]["Layers"],
    )
    assert first == second
    assert (
        pyunion("diff", "x1", home=home).stdout.decode()
        == "A /srv\nA /srv/app\nA /srv/app/run.sh\nA /srv/run\nD /var\n"
    )


def test_bare_directory_diff_rule(tmp_path, home):
    d = tmp_path / "layer"
    (d / "etc/ssl").mkdir(parents=True)
    (d / "etc/ssl/.wh.old.pem").write_text("")
    (d / "srv").mkdir()
    (d / "srv/.wh..wh..opq").write_text("")
    (d / "srv/x").write_text("x")
    (d / "new").mkdir()
    (d / "new/f").write_text("f")
    (d / ".wh..wh.pyunion").mkdir()
    (d / "etc/hostname").write_text("h")
    out = pyunion("diff", str(d), home=home).stdout.decode()
    assert out == "C /etc\nC /etc/ssl\nD /etc/ssl/old.pem\nA /new\nA /new/f\nC /srv\nA /srv/x\n"
    # with an image to compare against, the image decides
    out = pyunion("diff", str(d), "--image", "busy:1", home=home).stdout.decode()
    assert out == "C /etc\nA /etc/ssl\nD /etc/ssl/old.pem\nA /new\nA /new/f\nA /srv\nA /srv/x\n"


def test_device_whiteouts_diff_as_deletions(tmp_path, home):
    """A union hides lower names too long for `.wh.` whiteouts with 0/0 devices (as overlayfs
    does everywhere): diff reads them as deletions, whatever the name's length."""
    long = "L" * 253
    d = tmp_path / "layer"
    (d / "etc").mkdir(parents=True)
    os.mknod(d / "etc" / long, stat.S_IFCHR, 0)
    os.mknod(d / "etc" / "short", stat.S_IFCHR, 0)
    out = pyunion("diff", str(d), home=home).stdout.decode()
    assert out == f"C /etc\nD /etc/{long}\nD /etc/short\n"


def test_container_contract_errors(tmp_path, home):
    store = Store(home)
    layers = three_layers()[:1]
    archive = str(tmp_path / "other.tar")
    write_docker_save(archive, [(layers, config_for(layers), ["other:1"])])
    pyunion("image", "import", archive, home=home)
    store.prepare_container("web", "busy:1")
    with pytest.raises(UsageError, match="already exists"):
        store.prepare_container("web", "other:1")
    with pytest.raises(UsageError, match="no such image"):
        store.prepare_container("db", "nosuch:1")
    with pytest.raises(UsageError, match="invalid container name"):
        store.prepare_container("../x", "busy:1")
    assert sorted(os.listdir(os.path.join(home, "containers"))) == ["web"]
    with open(os.path.join(home, "containers", "web", "container.json")) as f:
        assert json.load(f)["image"] == inspect(home, "busy:1")["Id"]


def test_commit_refuses_a_metadata_only_copy_whose_data_no_layer_holds(home):
    """A metadata-only copy in a container's layer whose data is in none of the image's
    layers (a layer edited by hand, say) must not go into a commit as empty data: one line,
    and nothing is stored."""
    store = Store(home)
    upper = store.prepare_container("meta", "busy:1")
    layers_before = sorted(os.listdir(os.path.join(home, "layers")))
    images_before = sorted(os.listdir(os.path.join(home, "images")))
    path = os.path.join(upper, "lost")
    with open(path, "wb") as f:
        f.truncate(100)
    os.setxattr(path, "user.pyunion.metacopy", b"home/user/lost")
    line = one_line_error(pyunion("commit", "meta", "lost:1", home=home, check=False))
    assert "no layer of the image holds its data" in line and "/lost" in line
    assert sorted(os.listdir(os.path.join(home, "layers"))) == layers_before
    assert sorted(os.listdir(os.path.join(home, "images"))) == images_before
    assert os.listdir(os.path.join(home, "tmp")) == []


def test_rootless_commit_maps_the_callers_ids_back_to_root(shared_dir):
    home = os.path.join(shared_dir, "store")
    layers = three_layers()[:1]
    archive = os.path.join(shared_dir, "img.tar")
    write_docker_save(archive, [(layers, config_for(layers), ["base:1"])])
    os.chmod(archive, 0o644)

    def work() -> int:
        assert cli.main(["image", "import", archive]) == 0
        upper = Store(home).prepare_container("r", "base:1")
        os.mkdir(os.path.join(upper, "srv"))
        with open(os.path.join(upper, "srv/f"), "w") as f:
            f.write("mine\n")
        return cli.main(["commit", "r", "mine:1"])

    proc = as_nobody(work, home)
    assert proc.returncode == 0, proc.stderr.decode()
    assert os.stat(os.path.join(home, "containers/r/upper/srv/f")).st_uid == 65534
    diff_id = inspect(home, "mine:1")["RootFS"]["Layers"][-1]
    with tarfile.open(os.path.join(home, "layers", diff_id[7:], "layer.tar")) as tar:
        owners = {m.name: (m.uid, m.gid, m.uname, m.gname) for m in tar.getmembers()}
    assert owners == {"srv": (0, 0, "", ""), "srv/f": (0, 0, "", "")}


def test_deeply_nested_layer_diffs_commits_and_is_removed(home):
    """Nesting deeper than Python's recursion limit is handled (a container may create it)."""
    depth = 1100
    try:
        upper = Store(home).prepare_container("deep", "busy:1")
        fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY)
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        with open(os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "w") as f:
            f.write("bottom\n")
        os.close(fd)
        lines = pyunion("diff", "deep", home=home).stdout.decode().splitlines()
        assert len(lines) == depth + 1 and lines[-1] == "A " + "/d" * depth + "/leaf"
        pyunion("commit", "deep", "deep:1", home=home)
        diff_id = inspect(home, "deep:1")["RootFS"]["Layers"][-1]
        layer = os.path.join(home, "layers", diff_id[7:])
        leaf = os.path.join(layer, "tree", *(["d"] * depth), "leaf")
        assert open(leaf).read() == "bottom\n"
        pyunion("rm", "deep", home=home)
        pyunion("image", "rm", "deep:1", home=home)
        assert not os.path.exists(upper) and not os.path.exists(layer)
    finally:
        # pytest's own clean-up of old temporary directories recurses; never leave a deep tree
        subprocess.run(["rm", "-rf", home], check=True)
