"""`pyunion run`: parsing the command line into a RunSpec and running the container."""

import os
import re
import sys

from runner.cgroups import Limits, parse_size
from runner.errors import RunError
from runner.rootfs import Volume
from unionfs.branches import RW, BranchSpec, check_branches, parse_branches
from unionfs.errors import UsageError

USAGE = """\
usage: pyunion run [OPTIONS] ROOTFS|IMAGE [-- CMD [ARG...]]
  ROOTFS            read-only layers, top first: DIR[=ro+wh|ro]:DIR...
  --rw DIR          use (and keep) DIR as the writable layer
  --name NAME       keep the writable layer in the image store under NAME (images only)
  --hostname NAME   -e KEY=VAL   -w DIR   -u UID[:GID]   -v HOST:CT[:ro]
  --net host|none   --memory SIZE   --cpus N   --pids-limit N   -t   --chroot
"""
VALUE_OPTIONS = {
    "--hostname",
    "-e",
    "--env",
    "-w",
    "--workdir",
    "-u",
    "--user",
    "-v",
    "--volume",
    "--net",
    "--network",
    "--memory",
    "-m",
    "--cpus",
    "--pids-limit",
    "--rw",
    "--name",
}
FLAG_OPTIONS = {"-t", "--tty", "--chroot", "-h", "--help"}
HOSTNAME_RE = re.compile(
    r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
ENV_KEY_RE = re.compile(r"^[^=\0]+$")
USER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(:[A-Za-z0-9_][A-Za-z0-9_.-]*)?$")


def split_options(argv: list[str]) -> tuple[list[tuple[str, str | None]], str, list[str]]:
    """(options in order, ROOTFS, CMD)."""
    options, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--" or not arg.startswith("-") or arg == "-":
            break
        name, eq, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if not eq and arg[:2] in ("-e", "-w", "-u", "-v", "-m") and len(arg) > 2:
            name, value, eq = arg[:2], arg[2:], "="
        if name in FLAG_OPTIONS:
            if eq:
                raise UsageError(f"option {name} takes no value")
            options.append((name, None))
        elif name in VALUE_OPTIONS:
            if not eq:
                i += 1
                if i >= len(argv):
                    raise UsageError(f"option {name} needs a value")
                value = argv[i]
            options.append((name, value))
        else:
            raise UsageError(f"unknown option {arg} (see pyunion run --help)")
        i += 1
    if any(name in ("-h", "--help") for name, _ in options):
        return options, "", []
    if i < len(argv) and argv[i] == "--":
        i += 1
    if i >= len(argv):
        raise UsageError(
            "no ROOTFS or IMAGE given (usage: pyunion run [OPTIONS] ROOTFS [-- CMD [ARG...]])"
        )
    rootfs, rest = argv[i], argv[i + 1 :]
    if rest and rest[0] == "--":
        rest = rest[1:]
    return options, rootfs, rest


def parse_volume(text: str) -> Volume:
    parts = text.split(":")
    readonly = False
    if len(parts) == 3 and parts[2] in ("ro", "rw"):
        readonly = parts[2] == "ro"
        parts = parts[:2]
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise UsageError(f"-v {text}: expected HOST:CONTAINER[:ro]")
    host, target = parts
    if not os.path.exists(host):
        raise UsageError(f"-v {text}: host path {host} does not exist")
    if not target.startswith("/"):
        raise UsageError(f"-v {text}: container path {target} must be absolute")
    target = os.path.normpath(target)
    if target == "/" or target.split("/")[1] in ("proc", "dev", "sys"):
        raise UsageError(f"-v {text}: cannot mount over {target}")
    return Volume(os.path.realpath(host), target, readonly)


def parse_positive(option: str, text: str, kind):
    try:
        value = kind(text)
    except ValueError:
        value = 0
    if not value > 0 or value != value or value == float("inf"):
        raise UsageError(f"{option}: expected a positive number, got {text!r}")
    return value


def read_only_layers(rootfs: str) -> list[BranchSpec] | None:
    """The layers of a branch spec, or None when ROOTFS does not name existing directories."""
    try:
        layers = parse_branches("-:" + rootfs)[1:]  # so that the first layer defaults to ro+wh
    except UsageError:
        return None
    if not all(os.path.isdir(b.path) for b in layers):
        return None
    for b in layers:
        if b.mode == RW:
            raise UsageError(f"layer {b.path}: ROOTFS layers are read-only (use --rw DIR)")
    return layers


class Parsed:
    """The command line, interpreted (image configuration not yet applied)."""

    def __init__(self, argv: list[str]):
        options, self.rootfs, self.cmd = split_options(argv)
        self.help = any(name in ("-h", "--help") for name, _ in options)
        self.hostname = ""
        self.env: list[str] = []
        self.workdir: str | None = None
        self.user: str | None = None
        self.volumes: list[Volume] = []
        self.net = "host"
        self.limits = Limits()
        self.tty = self.use_chroot = False
        self.rw_dir: str | None = None
        self.name: str | None = None
        for name, value in options:
            self._apply(name, value)

    def _apply(self, name: str, value: str | None) -> None:
        if name == "--hostname":
            if len(value) > 64 or not HOSTNAME_RE.match(value):
                raise UsageError(f"--hostname: invalid host name {value!r}")
            self.hostname = value
        elif name in ("-e", "--env"):
            key = value.partition("=")[0]
            if not key or not ENV_KEY_RE.match(key):
                raise UsageError(f"-e {value}: expected KEY=VALUE")
            self.env.append(value)
        elif name in ("-w", "--workdir"):
            if not value.startswith("/"):
                raise UsageError(f"-w {value}: the working directory must be absolute")
            self.workdir = os.path.normpath(value)
        elif name in ("-u", "--user"):
            if not USER_RE.match(value):
                raise UsageError(f"-u {value}: expected UID[:GID] or NAME[:GROUP]")
            self.user = value
        elif name in ("-v", "--volume"):
            self.volumes.append(parse_volume(value))
        elif name in ("--net", "--network"):
            if value not in ("host", "none"):
                raise UsageError(f"--net {value}: expected host or none")
            self.net = value
        elif name in ("--memory", "-m"):
            self.limits.memory = parse_size(value)
        elif name == "--cpus":
            self.limits.cpus = parse_positive("--cpus", value, float)
        elif name == "--pids-limit":
            self.limits.pids = parse_positive("--pids-limit", value, int)
        elif name in ("-t", "--tty"):
            self.tty = True
        elif name == "--chroot":
            self.use_chroot = True
        elif name == "--rw":
            self.rw_dir = value
        elif name == "--name":
            self.name = value


def environment(image_env: list[str], cli_env: list[str]) -> dict[str, str]:
    env = {}
    for item in image_env:
        key, eq, val = item.partition("=")
        if key and eq:
            env[key] = val
    for item in cli_env:
        key, eq, val = item.partition("=")
        if eq:
            env[key] = val
        elif key in os.environ:
            env[key] = os.environ[key]
    return env


def check_user(user: str | None) -> None:
    """Rootless with only our own id mapped: the command can only run as root."""
    if os.geteuid() == 0 or not user or user.partition(":")[0] in ("0", "root"):
        return
    from runner.idmap import plan_mapping

    if not plan_mapping(os.getuid(), os.getgid()).full:
        raise UsageError(
            f"-u {user}: only root can be mapped (no /etc/subuid and /etc/subgid range for this user)"
        )


def image_layers(p: Parsed):
    """(layers, config, store) for an image reference; UsageError when there is no such image."""
    try:
        from runner.store import Store
    except ImportError:
        raise UsageError(f"{p.rootfs}: no such directory") from None
    store = Store()
    image = store.resolve_image(p.rootfs)
    if image is None:
        raise UsageError(f"{p.rootfs}: no such directory or image")
    return [BranchSpec(d, "ro+wh") for d in image.layer_dirs], image.config, store


def writable_layer(rw_dir: str, layers: list[BranchSpec]) -> tuple[list[BranchSpec], str]:
    """Check (and, if missing, create) the kept writable layer; a failed check creates nothing."""
    created = False
    if not os.path.lexists(rw_dir):
        parent = os.path.dirname(os.path.abspath(rw_dir))
        if not os.path.isdir(parent):
            raise UsageError(f"--rw {rw_dir}: {parent} is not a directory")
        try:
            os.mkdir(rw_dir, 0o755)
        except OSError as e:
            raise UsageError(f"--rw {rw_dir}: {e.strerror}") from None
        created = True
    try:
        checked = check_branches(layers + [BranchSpec(rw_dir, RW)])
    except UsageError:
        if created:
            os.rmdir(rw_dir)
        raise
    return checked[:-1], checked[-1].path


def build_spec(p: Parsed):
    """Resolve ROOTFS (directories or an image) and combine it with the options."""
    from runner.container import RunSpec

    config: dict = {}
    store = None
    layers = read_only_layers(p.rootfs)
    if layers is None:
        layers, config, store = image_layers(p)
    if p.name and store is None:
        raise UsageError("--name needs an image (for directories use --rw DIR)")
    if p.name and p.rw_dir:
        raise UsageError("--name and --rw cannot be used together")
    user = p.user or config.get("User") or None
    check_user(user)
    rw_dir = p.rw_dir
    if p.name:
        rw_dir = store.prepare_container(p.name, p.rootfs)
    if rw_dir is not None:
        layers, rw_dir = writable_layer(rw_dir, layers)
    else:
        layers = check_branches(layers)
    argv = list(config.get("Entrypoint") or []) + (p.cmd or list(config.get("Cmd") or []))
    return RunSpec(
        layers=layers,
        argv=argv or ["/bin/sh"],
        rw_dir=rw_dir,
        metacopy=p.rw_dir is None,
        env=environment(list(config.get("Env") or []), p.env),
        workdir=p.workdir or config.get("WorkingDir") or "/",
        user=user,
        hostname=p.hostname,
        volumes=p.volumes,
        net=p.net,
        limits=p.limits,
        tty=p.tty,
        use_chroot=p.use_chroot,
    )


def main(command: str, argv: list[str]) -> int:
    parsed = Parsed(argv)
    if parsed.help:
        sys.stdout.write(USAGE)
        return 0
    spec = build_spec(parsed)
    from runner.container import EXIT_RUNNER, Runner

    try:
        return Runner(spec).run()
    except RunError as e:
        print(f"pyunion: {e}", file=sys.stderr)
        return EXIT_RUNNER
    except OSError as e:
        print(f"pyunion: run failed: {e}", file=sys.stderr)
        return EXIT_RUNNER
