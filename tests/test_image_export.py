"""image export (docker and OCI formats) and re-import giving identical DiffIDs and image IDs."""

import hashlib
import json
import os
import tarfile

import pytest
from test_image_builders import (
    config_for,
    inspect,
    one_line_error,
    pyunion,
    sha,
    three_layers,
    write_docker_save,
)

from runner.store import Store


@pytest.fixture
def home(tmp_path):
    layers = three_layers()
    archive = str(tmp_path / "img.tar")
    write_docker_save(
        archive,
        [(layers, config_for(layers, Entrypoint=["/bin/sh", "-c"], Cmd=["echo hi"]), ["busy:1"])],
    )
    h = str(tmp_path / "store")
    pyunion("image", "import", archive, home=h)
    return h


def members(path: str) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_docker_export_format_and_round_trip(tmp_path, home):
    out = str(tmp_path / "out.tar")
    pyunion("image", "export", "busy:1", out, home=home)
    original = inspect(home, "busy:1")
    files = members(out)
    manifest = json.loads(files["manifest.json"])
    assert len(manifest) == 1 and manifest[0]["RepoTags"] == ["busy:1"]
    assert sha(files[manifest[0]["Config"]]) == original["Id"]
    assert [sha(files[name]) for name in manifest[0]["Layers"]] == original["RootFS"]["Layers"]

    other = str(tmp_path / "other-store")
    assert pyunion("image", "import", out, home=other).stdout == b"Loaded image: busy:1\n"
    again = inspect(other, "busy:1")
    assert again["Id"] == original["Id"]
    assert again["RootFS"]["Layers"] == original["RootFS"]["Layers"]
    assert again["Config"]["Entrypoint"] == ["/bin/sh", "-c"]

    # exporting is deterministic, and leaves no temporary files behind
    out2 = str(tmp_path / "out2.tar")
    pyunion("image", "export", "busy:1", out2, home=other)
    assert open(out, "rb").read() == open(out2, "rb").read()
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["img.tar", "store", "other-store", "out.tar", "out2.tar"]
    )


def test_oci_export_format_and_round_trip(tmp_path, home):
    out = str(tmp_path / "oci.tar")
    pyunion("image", "export", "busy:1", out, "--format", "oci", home=home)
    original = inspect(home, "busy:1")
    files = members(out)
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    for name, data in files.items():
        if name.startswith("blobs/sha256/"):
            assert hashlib.sha256(data).hexdigest() == name.rsplit("/", 1)[1]
    index = json.loads(files["index.json"])
    (desc,) = index["manifests"]
    assert desc["annotations"]["org.opencontainers.image.ref.name"] == "busy:1"
    manifest_bytes = files["blobs/sha256/" + desc["digest"][7:]]
    assert len(manifest_bytes) == desc["size"]
    manifest = json.loads(manifest_bytes)
    assert manifest["config"]["digest"] == original["Id"]
    assert [layer["digest"] for layer in manifest["layers"]] == original["RootFS"]["Layers"]
    assert all(
        layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar"
        for layer in manifest["layers"]
    )

    other = str(tmp_path / "other-store")
    pyunion("image", "import", out, home=other)
    assert inspect(other, "busy:1")["RootFS"]["Layers"] == original["RootFS"]["Layers"]
    assert inspect(other, "busy:1")["Id"] == original["Id"]


def test_committed_image_export_import_keeps_diff_ids(tmp_path, home):
    upper = Store(home).prepare_container("c", "busy:1")
    os.makedirs(os.path.join(upper, "srv"))
    with open(os.path.join(upper, "srv/file"), "w") as f:
        f.write("committed\n")
    open(os.path.join(upper, ".wh.opt"), "w").close()
    pyunion("commit", "c", "mine/app:2", home=home)
    committed = inspect(home, "mine/app:2")
    for fmt in ("docker", "oci"):
        out = str(tmp_path / f"app-{fmt}.tar")
        pyunion("image", "export", "mine/app:2", out, "--format", fmt, home=home)
        other = str(tmp_path / f"store-{fmt}")
        pyunion("image", "import", out, home=other)
        again = inspect(other, "mine/app:2")
        assert again["RootFS"]["Layers"] == committed["RootFS"]["Layers"]
        assert again["Id"] == committed["Id"]
        tree = os.path.join(other, "layers", committed["RootFS"]["Layers"][-1][7:], "tree")
        assert open(os.path.join(tree, "srv/file")).read() == "committed\n"
        assert os.path.isfile(os.path.join(tree, ".wh.opt"))


def test_export_errors(tmp_path, home):
    line = one_line_error(
        pyunion("image", "export", "busy:1", str(tmp_path), home=home, check=False)
    )
    assert "is a directory" in line
    line = one_line_error(
        pyunion(
            "image", "export", "busy:1", str(tmp_path / "no/such/dir.tar"), home=home, check=False
        )
    )
    assert "cannot write" in line
    one_line_error(
        pyunion(
            "image",
            "export",
            "busy:1",
            str(tmp_path / "x.tar"),
            "--format",
            "zip",
            home=home,
            check=False,
        )
    )
    assert not os.path.exists(tmp_path / "x.tar")
