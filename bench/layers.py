"""The benchmark's data: the same base, application and merged layers for every system, cached."""

import json
import os
import random
import shutil
import subprocess
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

LAYOUT_VERSION = 4

# paths inside the merged tree that the workloads use
BIG_FILE = "srv/big/big.bin"
BIG_DIR = "srv/many"
APP_TREE = "usr/lib/python3.11"
BASE_TREE = "usr/share"


class LayerError(Exception):
    """Building the layers failed (a tool is missing or failed); shown as one line."""


@dataclass(frozen=True)
class Profile:
    """How big the data set is: `full` is the documented benchmark, `tiny` a seconds-long smoke run."""

    name: str
    base: str  # "debootstrap" (Debian minbase) or "busybox" (a static shell and a few files)
    big_mib: int  # size of the big lower file
    many: int  # entries of the big directory, spread over both layers
    tar_files: int  # small files in the tarball the unpack workload extracts
    exec_count: int  # runs of /bin/true in the exec workload
    packages: tuple[str, ...]  # Debian packages the package install workload installs
    commits: int  # SQLite transactions of the commit workload


PROFILES = {
    "full": Profile("full", "debootstrap", 512, 10_000, 3000, 300,
                    ("perl-modules-5.36", "libpython3.11-stdlib"), 300),
    "tiny": Profile("tiny", "busybox", 4, 200, 50, 5, ("sensible-utils",), 10),
}


@dataclass(frozen=True)
class Layers:
    """Built layers: base (bottom), app (above it), native (both merged by copying) and a tarball."""

    root: Path
    profile: Profile

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def app(self) -> Path:
        return self.root / "app"

    @property
    def native(self) -> Path:
        return self.root / "native"

    @property
    def tarball(self) -> Path:
        return self.root / "unpack.tar"

    @property
    def debs(self) -> Path:
        """The package install workload's .deb files."""
        return self.root / "debs"

    @property
    def big_size(self) -> int:
        return self.profile.big_mib << 20


def debian_mirror() -> str:
    """The Debian mirror apt uses on this machine (debootstrap fetches from it too)."""
    candidates = [Path("/etc/apt/sources.list")]
    sources_d = Path("/etc/apt/sources.list.d")
    if sources_d.is_dir():
        candidates += sorted(sources_d.iterdir())
    for path in candidates:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            words = line.split()
            if not words or words[0].startswith("#"):
                continue
            urls = words[1:] if words[0] in ("URIs:", "deb") else []
            for url in urls:
                if url.startswith("http") and url.rstrip("/").endswith("/debian"):
                    return url
    return "http://deb.debian.org/debian"


def _run(argv: list[str], what: str, cwd: Path | None = None) -> None:
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=cwd)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise LayerError(f"{what} failed: {last}")


def _write(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    path.chmod(mode)


def _build_debootstrap_base(base: Path, mirror: str) -> None:
    if not shutil.which("debootstrap"):
        raise LayerError("debootstrap is not installed (apt-get install debootstrap)")
    _run(["debootstrap", "--variant=minbase", "bookworm", str(base), mirror], "debootstrap")


def _build_busybox_base(base: Path) -> None:
    busybox = Path("/bin/busybox")
    if not busybox.is_file():
        raise LayerError("/bin/busybox is missing (apt-get install busybox-static)")
    (base / "bin").mkdir(parents=True)
    shutil.copy2(busybox, base / "bin/busybox")
    for name in ("sh", "true", "ls", "cat"):
        (base / "bin" / name).symlink_to("busybox")
    (base / "tmp").mkdir(mode=0o1777)
    (base / "tmp").chmod(0o1777)
    _write(base / "etc/issue", "tiny base\n")
    for i in range(30):
        doc = base / BASE_TREE / "doc" / f"pkg{i:03d}"
        _write(doc / "copyright", f"package {i}\n" * 20)
        _write(doc / "changelog", f"change {i}\n" * 200)
    # an empty package database, for the package install workload
    _write(base / "var/lib/dpkg/status", "")
    for d in ("var/lib/dpkg/info", "var/lib/dpkg/updates", "var/log"):
        (base / d).mkdir(parents=True)


def _fetch_packages(debs: Path, packages: tuple[str, ...]) -> None:
    """The .deb files of PACKAGES, as the machine's apt sources have them."""
    if not shutil.which("apt-get"):
        raise LayerError("apt-get is missing: the package install workload needs Debian packages")
    debs.mkdir()
    download = ["apt-get", "download", "-o", "APT::Sandbox::User=root", *packages]
    what = f"apt-get download {' '.join(packages)}"
    try:
        _run(download, what, cwd=debs)
    except LayerError:  # no package lists yet (a fresh image): fetch them once
        _run(["apt-get", "update", "-qq"], "apt-get update")
        _run(download, what, cwd=debs)


def _build_app_tree(app: Path, profile: Profile) -> None:
    """The application layer's code tree: the host's Python standard library, or a small stand-in."""
    target = app / APP_TREE
    host_stdlib = Path("/usr/lib/python3.11")
    if profile.base == "debootstrap" and host_stdlib.is_dir():
        shutil.copytree(host_stdlib, target, symlinks=True)
        return
    for p in range(6):
        for m in range(10):
            source = f'"""module {p}.{m}"""\n\n\nclass Thing{m}:\n    def __init__(self):\n        self.n = {m}\n'
            _write(target / f"pkg{p}" / f"mod{m}.py", source * 5)


def _add_overrides(base: Path, app: Path) -> int:
    """Put a changed copy of some regular base files into the app layer; returns how many."""
    chosen = sorted(base.glob(f"{BASE_TREE}/doc/*/copyright"))[:100]
    chosen += [base / "etc" / n for n in ("issue", "debian_version", "motd")]
    count = 0
    for path in chosen:
        if os.path.realpath(path) != str(path) or not path.is_file():
            continue  # a symlink, or under a symlinked directory
        rel = path.relative_to(base)
        _write(app / rel, b"overridden by the app layer\n" + path.read_bytes())
        count += 1
    return count


def _add_big_dir(base: Path, app: Path, entries: int) -> None:
    """`entries` names in one directory: the first 60% in base, the last 60% in app (20% shadowed)."""
    cut_low, cut_high = entries * 2 // 5, entries * 3 // 5
    for layer, names in ((base, range(0, cut_high)), (app, range(cut_low, entries))):
        directory = layer / BIG_DIR
        directory.mkdir(parents=True)
        for i in names:
            (directory / f"f{i:05d}").write_bytes(b"%d\n" % i)


def _add_big_file(app: Path, size: int) -> None:
    path = app / BIG_FILE
    path.parent.mkdir(parents=True)
    chunk = random.Random(5).randbytes(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(chunk)


def _build_tarball(path: Path, files: int) -> None:
    rng = random.Random(7)
    staging = path.with_suffix(".d")
    shutil.rmtree(staging, ignore_errors=True)
    for i in range(files):
        _write(staging / f"d{i // 50:03d}" / f"file{i:05d}.txt", rng.randbytes(rng.randrange(64, 4096)))
    with tarfile.open(path, "w") as tar:
        tar.add(staging, arcname="unpacked")
    shutil.rmtree(staging)


def _merge_copy(layers: Layers) -> None:
    """The native system: one plain directory holding base with app copied over it."""
    native = layers.native
    native.mkdir()
    _run(["cp", "-a", f"{layers.base}/.", f"{native}/"], "copying base into the native tree")
    _run(
        ["cp", "-a", "--remove-destination", f"{layers.app}/.", f"{native}/"],
        "copying app into the native tree",
    )


def ensure_layers(out: Path, profile: Profile, mirror: str | None = None, log=print) -> Layers:
    """Build the layers for `profile` under out/layers/NAME unless an identical build is cached."""
    layers = Layers(out / "layers" / profile.name, profile)
    stamp = layers.root / "ready.json"
    wanted = json.loads(json.dumps({"layout": LAYOUT_VERSION, **asdict(profile)}))  # (tuples: lists)
    try:
        if json.loads(stamp.read_text()) == wanted:
            return layers
    except (OSError, ValueError):
        pass
    log(f"building the {profile.name} layers in {layers.root} ...")
    if layers.root.exists():
        _run(["rm", "-rf", str(layers.root)], "removing old layers")
    layers.root.mkdir(parents=True)
    layers.app.mkdir()
    if profile.base == "debootstrap":
        _build_debootstrap_base(layers.base, mirror or debian_mirror())
    else:
        _build_busybox_base(layers.base)
    _build_app_tree(layers.app, profile)
    _add_overrides(layers.base, layers.app)
    _add_big_dir(layers.base, layers.app, profile.many)
    _add_big_file(layers.app, layers.big_size)
    _build_tarball(layers.tarball, profile.tar_files)
    _fetch_packages(layers.debs, profile.packages)
    _merge_copy(layers)
    stamp.write_text(json.dumps(wanted))
    os.sync()
    return layers
