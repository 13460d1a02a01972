"""Hostile layer tars are refused with an error naming the entry, and nothing is left behind."""

import json
import os

import pytest
from test_image_builders import (
    as_nobody,
    busybox_layer,
    config_for,
    layer_tar,
    mounted,
    one_line_error,
    pyunion,
    sha,
    store_is_empty,
    write_docker_save,
)

from unionfs import cli


@pytest.fixture
def home(tmp_path):
    return str(tmp_path / "store")


@pytest.fixture
def outside(tmp_path):
    """A directory outside the store that hostile tars aim at, with one file in it."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "victim").write_text("original\n")
    return d


def hostile_cases(outside) -> dict[str, tuple[list[tuple], str]]:
    o = str(outside)
    return {
        "absolute": ([("file", f"{o}/pwned", "x")], f"{o}/pwned"),
        "dotdot": ([("file", "../../../pwned", "x")], "../../../pwned"),
        "inner-dotdot": ([("dir", "a"), ("file", "a/../../pwned", "x")], "a/../../pwned"),
        "symlink-absolute": ([("symlink", "link", o), ("file", "link/pwned", "x")], "link/pwned"),
        "symlink-relative": (
            [
                ("dir", "d"),
                ("symlink", "d/up", "../../../../../../../../.." + o),
                ("file", "d/up/victim", "changed"),
            ],
            "d/up/victim",
        ),
        "symlink-then-dir": ([("symlink", "link", o), ("dir", "link/sub")], "link/sub"),
        "hardlink-dotdot": ([("hardlink", "h", "../../outside/victim")], "h"),
        "hardlink-absolute": ([("hardlink", "h", f"{o}/victim")], "h"),
        "hardlink-missing": ([("hardlink", "h", "etc/shadow")], "h"),
        "hardlink-through-symlink": ([("symlink", "s", o), ("hardlink", "h", "s/victim")], "h"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "absolute",
        "dotdot",
        "inner-dotdot",
        "symlink-absolute",
        "symlink-relative",
        "symlink-then-dir",
        "hardlink-dotdot",
        "hardlink-absolute",
        "hardlink-missing",
        "hardlink-through-symlink",
    ],
)
def test_hostile_entry_refused(tmp_path, home, outside, case):
    entries, bad_entry = hostile_cases(outside)[case]
    layers = [busybox_layer(), layer_tar(entries)]
    archive = str(tmp_path / "evil.tar")
    write_docker_save(archive, [(layers, config_for(layers), ["evil:1"])])
    line = one_line_error(pyunion("image", "import", archive, home=home, check=False))
    message = line.split(": layer ", 1)[1]
    assert repr(bad_entry) in message and message.endswith("refused")
    if case.startswith("symlink") or case.endswith("through-symlink"):
        assert "through the symlink" in message
    assert sorted(os.listdir(outside)) == ["victim"]
    assert (outside / "victim").read_text() == "original\n"
    assert store_is_empty(home)


def test_symlink_in_lower_layer_refused(tmp_path, home, outside):
    base = layer_tar([("dir", "etc"), ("symlink", "etc/conf", str(outside))])
    top = layer_tar([("file", "etc/conf/pwned", "x")])
    archive = str(tmp_path / "evil.tar")
    write_docker_save(archive, [([base, top], config_for([base, top]), ["evil:2"])])
    line = one_line_error(pyunion("image", "import", archive, home=home, check=False))
    assert "'etc/conf/pwned'" in line and "lower layer" in line
    assert sorted(os.listdir(outside)) == ["victim"]
    assert store_is_empty(home)


def test_redeclared_directory_over_lower_symlink_is_fine(tmp_path, home, outside):
    """A layer that replaces a lower symlink by a real directory writes into its own directory."""
    base = layer_tar([("symlink", "conf", str(outside))])
    top = layer_tar([("dir", "conf"), ("file", "conf/setting", "on\n")])
    archive = str(tmp_path / "ok.tar")
    write_docker_save(archive, [([base, top], config_for([base, top]), ["ok:1"])])
    pyunion("image", "import", archive, home=home)
    tree = os.path.join(home, "layers", sha(top)[7:], "tree")
    assert open(os.path.join(tree, "conf/setting")).read() == "on\n"
    assert sorted(os.listdir(outside)) == ["victim"]


def test_same_tar_entries_replace_each_other_safely(tmp_path, home, outside):
    """A later entry replaces an earlier symlink in the same layer instead of following it."""
    layer = layer_tar([("symlink", "f", str(outside / "victim")), ("file", "f", "mine\n")])
    archive = str(tmp_path / "ok.tar")
    write_docker_save(archive, [([layer], config_for([layer]), ["ok:2"])])
    pyunion("image", "import", archive, home=home)
    path = os.path.join(home, "layers", sha(layer)[7:], "tree", "f")
    assert not os.path.islink(path) and open(path).read() == "mine\n"
    assert (outside / "victim").read_text() == "original\n"


def run_as_nobody(args, home):
    return as_nobody(lambda: cli.main(args), home)


def test_rootless_import_records_ownership_and_refuses_devices(shared_dir):
    home = os.path.join(shared_dir, "store")
    owned = layer_tar([("dir", "srv"), ("file", "srv/f", "data\n")])
    good = os.path.join(shared_dir, "good.tar")
    write_docker_save(good, [([owned], config_for([owned]), ["owned:1"])])
    os.chmod(good, 0o644)
    proc = run_as_nobody(["image", "import", good], home)
    assert proc.returncode == 0, proc.stderr.decode()
    with open(os.path.join(home, "layers", sha(owned)[7:], "layer.json")) as f:
        info = json.load(f)
    assert {"path": "/srv/f", "uid": 0, "gid": 0} in info["unapplied"]
    assert {"path": "/srv", "uid": 0, "gid": 0} in info["unapplied"]
    tree = os.path.join(home, "layers", sha(owned)[7:], "tree")
    assert os.stat(os.path.join(tree, "srv/f")).st_uid == 65534
    assert open(os.path.join(tree, "srv/f")).read() == "data\n"

    device = layer_tar([("dir", "dev"), ("chr", "dev/null", 1, 3)])
    bad = os.path.join(shared_dir, "dev.tar")
    write_docker_save(bad, [([device], config_for([device]), ["dev:1"])])
    os.chmod(bad, 0o644)
    line = one_line_error(run_as_nobody(["image", "import", bad], home))
    assert "'dev/null'" in line and "device" in line
    assert not os.path.exists(os.path.join(home, "layers", sha(device)[7:]))
    assert os.listdir(os.path.join(home, "tmp")) == []


def test_root_may_import_device_nodes_and_overlay_whiteouts(tmp_path, home):
    layer = layer_tar([("dir", "dev"), ("chr", "dev/null", 1, 3), ("chr", "gone", 0, 0)])
    archive = str(tmp_path / "dev.tar")
    write_docker_save(archive, [([layer], config_for([layer]), ["dev:2"])])
    pyunion("image", "import", archive, home=home)
    tree = os.path.join(home, "layers", sha(layer)[7:], "tree")
    st = os.stat(os.path.join(tree, "dev/null"))
    assert os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3
    # an overlayfs 0/0 whiteout becomes the OCI form the union and diff understand
    assert os.path.isfile(os.path.join(tree, ".wh.gone")) and not os.path.exists(
        os.path.join(tree, "gone")
    )


def test_archive_paths_and_digests_cannot_leave_the_archive(tmp_path, home, outside):
    """Manifests naming files outside an unpacked archive, or malformed digests, are refused."""
    layer = layer_tar([("file", "f", "x")])
    (outside / "layer.tar").write_bytes(layer)
    saved = tmp_path / "saved"
    saved.mkdir()
    config = json.dumps(config_for([layer])).encode()
    (saved / (sha(config)[7:] + ".json")).write_bytes(config)
    manifest = [
        {
            "Config": sha(config)[7:] + ".json",
            "RepoTags": ["x:1"],
            "Layers": ["../outside/layer.tar"],
        }
    ]
    (saved / "manifest.json").write_text(json.dumps(manifest))
    line = one_line_error(pyunion("image", "import", str(saved), home=home, check=False))
    assert "'../outside/layer.tar'" in line and "leaves the archive" in line
    (saved / "escape").symlink_to(outside)
    manifest[0]["Layers"] = ["escape/layer.tar"]
    (saved / "manifest.json").write_text(json.dumps(manifest))
    line = one_line_error(pyunion("image", "import", str(saved), home=home, check=False))
    assert "'escape/layer.tar'" in line and "leaves the archive" in line

    layout = tmp_path / "layout"
    (layout / "blobs").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    bad = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": "sha256:../../../outside/victim",
    }
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [bad]}))
    line = one_line_error(pyunion("image", "import", str(layout), home=home, check=False))
    assert "malformed digest" in line
    assert store_is_empty(home)
    assert sorted(os.listdir(outside)) == ["layer.tar", "victim"]


def test_a_layer_cannot_mark_its_files_as_metadata_only_copies(tmp_path, home):
    """The union's own xattrs are not taken from a layer: a file claiming that its data is
    another file's (see unionfs.metacopy) keeps its own."""
    base = layer_tar([("dir", "etc"), ("file", "etc/secret", "another file\n")])
    top = layer_tar([("file", "claim", "its own data\n", 0o644, 0, 0,
                      {"user.pyunion.metacopy": "etc/secret"})])
    archive = str(tmp_path / "claim.tar")
    write_docker_save(archive, [([base, top], config_for([base, top]), ["claim:1"])])
    pyunion("image", "import", archive, home=home)
    tree = os.path.join(home, "layers", sha(top)[7:], "tree")
    assert "user.pyunion.metacopy" not in os.listxattr(os.path.join(tree, "claim"))
    upper = tmp_path / "upper"
    upper.mkdir()
    layer_dirs = [tree, os.path.join(home, "layers", sha(base)[7:], "tree")]
    with mounted(str(upper), layer_dirs, str(tmp_path / "mnt")) as mnt:
        with open(os.path.join(mnt, "claim")) as f:
            assert f.read() == "its own data\n"
