"""Interoperability with containers/image (the library under podman load), through skopeo."""

import json
import os
import shutil
import subprocess

import pytest
from test_image_builders import config_for, inspect, pyunion, three_layers, write_docker_save

pytestmark = pytest.mark.skipif(
    not shutil.which("skopeo"), reason="skopeo not installed (apt package skopeo)"
)


def skopeo(*args: str) -> str:
    proc = subprocess.run(["skopeo", "--insecure-policy", *args], capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


@pytest.fixture
def home(tmp_path):
    layers = three_layers()
    archive = str(tmp_path / "img.tar")
    write_docker_save(archive, [(layers, config_for(layers), ["busy:1"])])
    h = str(tmp_path / "store")
    pyunion("image", "import", archive, home=h)
    return h


def test_exports_are_read_by_containers_image(tmp_path, home):
    diff_ids = inspect(home, "busy:1")["RootFS"]["Layers"]
    docker_tar, oci_tar = str(tmp_path / "d.tar"), str(tmp_path / "o.tar")
    pyunion("image", "export", "busy:1", docker_tar, home=home)
    pyunion("image", "export", "busy:1", oci_tar, "--format", "oci", home=home)
    assert json.loads(skopeo("inspect", f"docker-archive:{docker_tar}"))["Layers"] == diff_ids
    assert json.loads(skopeo("inspect", f"oci-archive:{oci_tar}"))["Layers"] == diff_ids
    config = json.loads(skopeo("inspect", "--config", f"docker-archive:{docker_tar}"))
    assert config["rootfs"]["diff_ids"] == diff_ids


def test_skopeo_written_zstd_and_gzip_layouts_import(tmp_path, home):
    diff_ids = inspect(home, "busy:1")["RootFS"]["Layers"]
    docker_tar = str(tmp_path / "d.tar")
    pyunion("image", "export", "busy:1", docker_tar, home=home)
    for fmt in ("gzip", "zstd"):
        if fmt == "zstd" and not shutil.which("zstd"):
            continue
        layout = str(tmp_path / f"layout-{fmt}")
        skopeo(
            "copy",
            "--dest-compress",
            "--dest-compress-format",
            fmt,
            f"docker-archive:{docker_tar}",
            f"oci:{layout}:{fmt}",
        )
        media = {
            json.loads(open(os.path.join(layout, "index.json")).read())["manifests"][0]["mediaType"]
        }
        assert media == {"application/vnd.oci.image.manifest.v1+json"}
        other = str(tmp_path / f"store-{fmt}")
        assert (
            pyunion("image", "import", layout, home=other).stdout.decode()
            == f"Loaded image: layout-{fmt}:{fmt}\n"
        )
        assert inspect(other, f"layout-{fmt}:{fmt}")["RootFS"]["Layers"] == diff_ids
