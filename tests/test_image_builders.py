"""Builders for image tests: layer tars, docker-save archives and OCI layouts written by hand."""

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

BUSYBOX = "/bin/busybox"
PYUNION = [sys.executable, "-m", "unionfs"]


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(entries: list[tuple]) -> bytes:
    """A layer tar from (kind, name, ...) tuples: file/dir/symlink/hardlink/chr/fifo."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for kind, name, *rest in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1_600_000_000
            info.uid = info.gid = 0
            if kind == "file":
                data = rest[0] if isinstance(rest[0], bytes) else rest[0].encode()
                info.size, info.mode = len(data), rest[1] if len(rest) > 1 else 0o644
                if len(rest) > 2:  # (uid, gid, {xattr: value})
                    info.uid, info.gid = rest[2], rest[3]
                    info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in rest[4].items()}
                tar.addfile(info, io.BytesIO(data))
                continue
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, rest[0] if rest else 0o755
            elif kind == "symlink":
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, rest[0], 0o777
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, rest[0]
            elif kind == "chr":
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, rest[0], rest[1]
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            else:
                raise ValueError(kind)
            tar.addfile(info)
    return buf.getvalue()


def busybox_layer() -> bytes:
    """A base layer: busybox and a few applet links, /etc, /tmp, /home/user with files."""
    with open(BUSYBOX, "rb") as f:
        busybox = f.read()
    return layer_tar(
        [
            ("dir", "bin"),
            ("file", "bin/busybox", busybox, 0o755),
            ("symlink", "bin/sh", "busybox"),
            ("symlink", "bin/ls", "busybox"),
            ("symlink", "bin/cat", "busybox"),
            ("dir", "etc"),
            ("file", "etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
            ("file", "etc/motd", "base motd\n"),
            ("dir", "tmp", 0o1777),
            ("dir", "home"),
            ("dir", "home/user"),
            ("file", "home/user/a.txt", "a from base\n"),
            ("file", "home/user/b.txt", "b from base\n"),
            ("dir", "data"),
            ("file", "data/old1", "old1\n"),
            ("file", "data/old2", "old2\n"),
            ("dir", "var"),
            ("file", "var/log.txt", "log\n"),
        ]
    )


def config_for(layers: list[bytes], **config) -> dict:
    return {
        "architecture": "amd64",
        "os": "linux",
        "created": "2024-01-02T03:04:05Z",
        "config": config or {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [sha(x) for x in layers]},
        "history": [{"created_by": f"layer {i}"} for i in range(len(layers))],
    }


def three_layers() -> list[bytes]:
    """busybox base; a layer adding and overwriting files; a layer with whiteouts and an opaque dir."""
    middle = layer_tar(
        [
            ("dir", "home"),
            ("dir", "home/user"),
            ("file", "home/user/a.txt", "a from middle\n"),
            ("file", "home/user/c.txt", "c from middle\n"),
            ("dir", "opt"),
            ("file", "opt/tool", "#!/bin/sh\necho tool\n", 0o755),
            ("hardlink", "opt/tool-link", "opt/tool"),
        ]
    )
    top = layer_tar(
        [
            ("dir", "home"),
            ("dir", "home/user"),
            ("file", "home/user/.wh.b.txt", ""),
            ("dir", "data"),
            ("file", "data/.wh..wh..opq", ""),
            ("file", "data/new", "new data\n"),
            ("file", ".wh.var", ""),
        ]
    )
    return [busybox_layer(), middle, top]


def write_docker_save(
    path: str, images: list[tuple[list[bytes], dict, list[str]]], gz: bool = False
) -> None:
    """A `docker save` tarball holding (layers, config, RepoTags) images."""
    files: dict[str, bytes] = {}
    manifest = []
    for layers, config, tags in images:
        cbytes = json.dumps(config).encode()
        cname = sha(cbytes)[7:] + ".json"
        files[cname] = cbytes
        names = []
        for data in layers:
            lname = sha(data)[7:] + "/layer.tar"
            files[lname] = gzip.compress(data, mtime=0) if gz else data
            names.append(lname)
        manifest.append({"Config": cname, "RepoTags": tags, "Layers": names})
    files["manifest.json"] = json.dumps(manifest).encode()
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def compress(data: bytes, how: str | None) -> tuple[bytes, str]:
    base = "application/vnd.oci.image.layer.v1.tar"
    if how == "gzip":
        return gzip.compress(data, mtime=0), base + "+gzip"
    if how == "zstd":
        out = subprocess.run(
            ["zstd", "-q", "-c"], input=data, stdout=subprocess.PIPE, check=True
        ).stdout
        return out, base + "+zstd"
    return data, base


def write_oci_layout(
    path: str,
    layers: list[bytes],
    config: dict,
    ref_name: str | None,
    how: str | None = "gzip",
    as_tar: bool = False,
) -> None:
    """An OCI image layout (directory, or tarball if as_tar) with one image."""
    blobs: dict[str, bytes] = {}
    cbytes = json.dumps(config).encode()
    blobs[sha(cbytes)] = cbytes
    descs = []
    for data in layers:
        blob, media = compress(data, how)
        blobs[sha(blob)] = blob
        descs.append({"mediaType": media, "digest": sha(blob), "size": len(blob)})
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha(cbytes),
            "size": len(cbytes),
        },
        "layers": descs,
    }
    mbytes = json.dumps(manifest).encode()
    blobs[sha(mbytes)] = mbytes
    desc = {"mediaType": manifest["mediaType"], "digest": sha(mbytes), "size": len(mbytes)}
    if ref_name:
        desc["annotations"] = {"org.opencontainers.image.ref.name": ref_name}
    files = {
        "oci-layout": b'{"imageLayoutVersion": "1.0.0"}',
        "index.json": json.dumps({"schemaVersion": 2, "manifests": [desc]}).encode(),
    }
    for digest, data in blobs.items():
        files["blobs/sha256/" + digest[7:]] = data
    if as_tar:
        with tarfile.open(path, "w") as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return
    for name, data in files.items():
        os.makedirs(os.path.dirname(os.path.join(path, name)) or path, exist_ok=True)
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)


def pyunion(
    *args, home: str, check: bool = True, input: bytes | None = None, path: str | None = None
):
    """Run the pyunion command line with a private store (and optionally another $PATH)."""
    env = dict(os.environ, PYUNION_HOME=home)
    if path is not None:
        env["PATH"] = path
    proc = subprocess.run([*PYUNION, *args], env=env, input=input, capture_output=True)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"pyunion {' '.join(args)} failed ({proc.returncode}): {proc.stderr.decode()}"
        )
    return proc


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """Assert a failed command printed exactly one `pyunion: ...` line and return it."""
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyunion: "), proc.stderr.decode()
    assert "Traceback" not in proc.stderr.decode()
    return lines[0]


def store_is_empty(home: str) -> bool:
    """No layers, images, names or staging leftovers in the store at `home`."""
    for sub in ("layers", "images", "tmp"):
        d = os.path.join(home, sub)
        if os.path.isdir(d) and os.listdir(d):
            return False
    names = os.path.join(home, "names.json")
    return not os.path.exists(names) or json.load(open(names)) == {}


def inspect(home: str, ref: str) -> dict:
    docs = json.loads(pyunion("image", "inspect", ref, home=home).stdout)
    assert isinstance(docs, list) and len(docs) == 1
    return docs[0]


def is_mounted(path: str) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


class mounted:
    """`with mounted(upper, layer_dirs, mnt):` a real pyunion mount (upper rw over the layers)."""

    def __init__(self, upper: str, layer_dirs: list[str], mnt: str):
        self.spec = ":".join([f"{upper}=rw", *(f"{d}=ro+wh" for d in layer_dirs)])
        self.mnt = mnt

    def __enter__(self) -> str:
        os.makedirs(self.mnt, exist_ok=True)
        proc = subprocess.run(
            [*PYUNION, "mount", self.spec, self.mnt], capture_output=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr.decode()
        assert is_mounted(self.mnt)
        return self.mnt

    def __exit__(self, *exc) -> None:
        if is_mounted(self.mnt):
            subprocess.run([*PYUNION, "umount", self.mnt], capture_output=True, timeout=60)
        if is_mounted(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", self.mnt], capture_output=True)
        assert not is_mounted(self.mnt)


def as_nobody(fn, home: str) -> subprocess.CompletedProcess:
    """Run fn() -> exit code in a forked child that dropped to uid/gid 65534; its stderr captured.

    Forking (instead of running the command line anew) works wherever the checkout lives.
    """
    import runner.images  # noqa: F401  (loaded before the child loses access to the checkout)

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_end)
            sys.stderr = open(write_end, "w")  # pytest replaced the original
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.environ["PYUNION_HOME"] = home
            code = fn() or 0
        except BaseException as e:
            print(f"pyunion: test child failed: {e!r}", file=sys.stderr)
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        err = f.read()
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return subprocess.CompletedProcess([], code, b"", err)
