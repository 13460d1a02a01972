"""Importing docker-save archives and OCI layouts into the store; ls, inspect, rm."""

import gzip
import json
import os
import shutil
import stat

import pytest
from test_image_builders import (
    config_for,
    inspect,
    layer_tar,
    mounted,
    one_line_error,
    pyunion,
    sha,
    store_is_empty,
    three_layers,
    write_docker_save,
    write_oci_layout,
)

from runner.store import Store


@pytest.fixture
def home(tmp_path):
    return str(tmp_path / "store")


def layer_dir(home: str, diff_id: str) -> str:
    return os.path.join(home, "layers", diff_id[7:], "tree")


def check_three_layer_store(home: str, layers: list[bytes], ref: str) -> None:
    doc = inspect(home, ref)
    assert doc["RootFS"] == {"Type": "layers", "Layers": [sha(x) for x in layers]}
    base, middle, top = (layer_dir(home, sha(x)) for x in layers)
    with open(os.path.join(base, "bin/busybox"), "rb") as f, open("/bin/busybox", "rb") as g:
        assert f.read() == g.read()
    assert os.stat(os.path.join(base, "bin/busybox")).st_mode & 0o777 == 0o755
    assert os.readlink(os.path.join(base, "bin/sh")) == "busybox"
    assert stat.S_IMODE(os.stat(os.path.join(base, "tmp")).st_mode) == 0o1777
    assert os.stat(os.path.join(base, "etc/passwd")).st_mtime == 1_600_000_000
    assert open(os.path.join(middle, "home/user/a.txt")).read() == "a from middle\n"
    # hard link inside the layer stays a hard link
    assert (
        os.stat(os.path.join(middle, "opt/tool")).st_ino
        == os.stat(os.path.join(middle, "opt/tool-link")).st_ino
    )
    # whiteouts and the opaque marker are kept in the OCI/aufs form, usable as a ro+wh branch
    assert os.path.isfile(os.path.join(top, "home/user/.wh.b.txt"))
    assert os.path.isfile(os.path.join(top, "data/.wh..wh..opq"))
    assert os.path.isfile(os.path.join(top, ".wh.var"))
    assert sorted(os.listdir(os.path.join(top, "data"))) == [".wh..wh..opq", "new"]
    # the layer's own tar is kept and hashes to its DiffID
    for data in layers:
        with open(os.path.join(home, "layers", sha(data)[7:], "layer.tar"), "rb") as f:
            assert sha(f.read()) == sha(data)


def test_docker_save_import_multi_layer(tmp_path, home):
    layers = three_layers()
    config = config_for(
        layers,
        Cmd=["/bin/sh", "-c", "echo hi"],
        Env=["PATH=/bin", "A=1"],
        WorkingDir="/home/user",
        User="0:0",
    )
    archive = str(tmp_path / "img.tar")
    write_docker_save(archive, [(layers, config, ["busy:1.0"])])
    out = pyunion("image", "import", archive, home=home).stdout.decode()
    assert out == "Loaded image: busy:1.0\n"
    check_three_layer_store(home, layers, "busy:1.0")
    doc = inspect(home, "busy:1.0")
    assert doc["Id"] == sha(json.dumps(config).encode())
    assert doc["RepoTags"] == ["busy:1.0"]
    assert doc["Config"]["Cmd"] == ["/bin/sh", "-c", "echo hi"]
    assert doc["Config"]["Env"] == ["PATH=/bin", "A=1"]
    assert doc["Config"]["WorkingDir"] == "/home/user"
    assert doc["Config"]["User"] == "0:0"
    assert doc["Config"]["Entrypoint"] is None
    # the contract the runner uses
    image = Store(home).resolve_image("busy:1.0")
    assert image.layer_dirs == [layer_dir(home, sha(x)) for x in reversed(layers)]
    assert image.config["WorkingDir"] == "/home/user"
    assert Store(home).resolve_image("nothere") is None
    assert Store(home).resolve_image(doc["Id"][7:19]).id == doc["Id"]


@pytest.mark.parametrize("how", [None, "gzip", "zstd"])
def test_oci_layout_directory_import(tmp_path, home, how):
    if how == "zstd" and not shutil.which("zstd"):
        pytest.skip("zstd command not installed (apt package zstd)")
    layers = three_layers()
    layout = str(tmp_path / "layout")
    write_oci_layout(layout, layers, config_for(layers), "example.com/team/busy:v2", how)
    assert (
        pyunion("image", "import", layout, home=home).stdout
        == b"Loaded image: example.com/team/busy:v2\n"
    )
    check_three_layer_store(home, layers, "example.com/team/busy:v2")


def test_oci_layout_tar_with_tag_only_ref_and_name_option(tmp_path, home):
    layers = three_layers()
    archive = str(tmp_path / "busy.tar")
    write_oci_layout(archive, layers, config_for(layers), "3.1", "gzip", as_tar=True)
    assert pyunion("image", "import", archive, home=home).stdout == b"Loaded image: busy:3.1\n"
    pyunion("image", "import", archive, "--name", "other/name:x", home=home)
    assert inspect(home, "other/name:x")["RepoTags"] == ["busy:3.1", "other/name:x"]
    ls = pyunion("image", "ls", home=home).stdout.decode().splitlines()
    assert ls[0].split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "SIZE"]
    assert [line.split()[:2] for line in ls[1:]] == [["busy", "3.1"], ["other/name", "x"]]
    # three layers unpacked once, shared by both names
    assert len(os.listdir(os.path.join(home, "layers"))) == 3


def test_gzip_docker_save_and_shared_layers(tmp_path, home):
    layers = three_layers()
    second = layers[:2] + [layer_tar([("file", "extra", "x\n")])]
    archive = str(tmp_path / "two.tar")
    write_docker_save(
        archive,
        [(layers, config_for(layers), ["one:1"]), (second, config_for(second), ["two:1"])],
        gz=True,
    )
    out = pyunion("image", "import", archive, home=home).stdout.decode().splitlines()
    assert out == ["Loaded image: one:1", "Loaded image: two:1"]
    assert len(os.listdir(os.path.join(home, "layers"))) == 4
    assert (
        inspect(home, "two:1")["RootFS"]["Layers"][:2]
        == inspect(home, "one:1")["RootFS"]["Layers"][:2]
    )
    # removing one image keeps the shared layers, deletes only its own
    out = pyunion("image", "rm", "one:1", home=home).stdout.decode().splitlines()
    assert out[0] == "Untagged: one:1" and out[1].startswith("Deleted: sha256:")
    remaining = sorted(os.listdir(os.path.join(home, "layers")))
    assert remaining == sorted(x[7:] for x in inspect(home, "two:1")["RootFS"]["Layers"])
    pyunion("image", "rm", "two:1", home=home)
    assert store_is_empty(home)


def test_whiteouts_too_long_for_a_file_name_are_stored_as_devices(tmp_path, home):
    """`.wh.` + a 253-byte name is too long for a file name: such a whiteout is stored as a
    0/0 device of the hidden name (as the union makes them), and hides that name in a mount
    of the image's layers; a short one stays a `.wh.` file."""
    long = "L" * 253
    base = layer_tar([("dir", "d"), ("file", f"d/{long}", "lower"), ("file", "d/short", "s"),
                      ("file", "d/kept", "k"), ("dir", f"e/{long}"), ("file", f"e/{long}/old", "o")])
    top = layer_tar([("dir", "d"), ("file", f"d/.wh.{long}", ""), ("file", "d/.wh.short", ""),
                     ("file", f"e/{long}/new", "n")])
    archive = str(tmp_path / "img.tar")
    write_docker_save(archive, [([base, top], config_for([base, top]), ["wh:1"])])
    pyunion("image", "import", archive, home=home)
    base_dir, top_dir = (layer_dir(home, sha(x)) for x in (base, top))
    st = os.lstat(os.path.join(top_dir, "d", long))
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.path.isfile(os.path.join(top_dir, "d", ".wh.short"))
    assert open(os.path.join(base_dir, "d", long)).read() == "lower"
    (tmp_path / "up").mkdir()
    with mounted(str(tmp_path / "up"), [top_dir, base_dir], str(tmp_path / "mnt")) as mnt:
        assert os.listdir(os.path.join(mnt, "d")) == ["kept"]
        assert sorted(os.listdir(os.path.join(mnt, "e", long))) == ["new", "old"]


def test_corrupt_layer_leaves_nothing(tmp_path, home):
    layers = three_layers()
    config = config_for(layers)
    config["rootfs"]["diff_ids"][2] = sha(b"something else")
    archive = str(tmp_path / "bad.tar")
    write_docker_save(archive, [(layers, config, ["bad:1"])])
    line = one_line_error(pyunion("image", "import", archive, home=home, check=False))
    assert "does not match DiffID" in line
    assert store_is_empty(home)


def test_oci_blob_digest_and_size_are_verified(tmp_path, home):
    layers = three_layers()
    layout = str(tmp_path / "layout")
    write_oci_layout(layout, layers, config_for(layers), "busy:1", "gzip")
    blob_dir = os.path.join(layout, "blobs/sha256")
    manifest = json.load(open(os.path.join(layout, "index.json")))["manifests"][0]["digest"][7:]
    top_blob = json.load(open(os.path.join(blob_dir, manifest)))["layers"][2]["digest"][7:]
    # same content, different gzip bytes: the DiffID matches but the blob digest does not
    with open(os.path.join(blob_dir, top_blob), "wb") as f:
        f.write(gzip.compress(layers[2], mtime=12345))
    line = one_line_error(pyunion("image", "import", layout, home=home, check=False))
    assert "does not match" in line and top_blob[:12] in line
    assert store_is_empty(home)
    with open(os.path.join(blob_dir, manifest), "ab") as f:
        f.write(b" ")
    line = one_line_error(pyunion("image", "import", layout, home=home, check=False))
    assert "size" in line and manifest in line
    assert store_is_empty(home)


def test_bad_input_gives_one_line_errors(tmp_path, home):
    not_tar = tmp_path / "x.txt"
    not_tar.write_text("hello\n")
    for args in (
        ["image", "import", str(tmp_path / "missing.tar")],
        ["image", "import", str(not_tar)],
        ["image", "import", str(tmp_path)],
        ["image", "inspect", "nosuch"],
        ["image", "rm", "nosuch"],
        ["image", "export", "nosuch", str(tmp_path / "o.tar")],
        ["image", "frobnicate"],
        ["image", "import"],
        ["image", "import", str(not_tar), "--name", "Bad Name"],
        ["diff", "nosuch"],
        ["commit", "nosuch", "x:1"],
        ["rm", "nosuch"],
    ):
        one_line_error(pyunion(*args, home=home, check=False))
    assert not_tar.read_text() == "hello\n"
    assert store_is_empty(home)


def test_zstd_layer_without_zstd_command_is_a_clear_error(tmp_path, home):
    if not shutil.which("zstd"):
        pytest.skip("zstd command not installed (apt package zstd)")
    layers = three_layers()
    layout = str(tmp_path / "layout")
    write_oci_layout(layout, layers, config_for(layers), "busy:z", "zstd")
    empty_path = tmp_path / "empty-bin"
    empty_path.mkdir()
    line = one_line_error(
        pyunion("image", "import", layout, home=home, check=False, path=str(empty_path))
    )
    assert "zstd" in line and "not installed" in line
    assert store_is_empty(home)


def test_root_import_applies_exact_ownership_and_xattrs(tmp_path, home):
    layer = layer_tar(
        [
            ("dir", "srv"),
            ("file", "srv/owned", "o\n", 0o4750, 1234, 99, {"user.origin": "test-layer"}),
        ]
    )
    archive = str(tmp_path / "own.tar")
    write_docker_save(archive, [([layer], config_for([layer]), ["own:1"])])
    pyunion("image", "import", archive, home=home)
    path = os.path.join(layer_dir(home, sha(layer)), "srv/owned")
    st = os.stat(path)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 99, 0o4750)
    assert os.getxattr(path, "user.origin") == b"test-layer"
    with open(os.path.join(home, "layers", sha(layer)[7:], "layer.json")) as f:
        assert json.load(f)["unapplied"] == []
