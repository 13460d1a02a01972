"""The `pyunion` command line: dispatches subcommands and turns bad input into one-line errors."""

import importlib
import sys

from unionfs.errors import UsageError

USAGE = """\
usage: pyunion mount [-o OPT[,OPT...]] [-f] [-d] BRANCHES MOUNTPOINT
       pyunion umount MOUNTPOINT
       pyunion refresh MOUNTPOINT
       pyunion demo
       pyunion run [OPTIONS] ROOTFS|IMAGE [-- CMD [ARG...]]
       pyunion image import|ls|rm|inspect|export ...
       pyunion ps | rm NAME | diff NAME|DIR | commit NAME IMAGE[:TAG]
       pyunion [SOURCE] MOUNTPOINT -o lowerdir=L1:L2[,upperdir=U,workdir=W]   (mount helper form)
"""

# subcommand -> module whose main(argv) handles it (argv starts after the subcommand)
COMMANDS = {
    "mount": "unionfs.mountcmd",
    "umount": "unionfs.mountcmd",
    "refresh": "unionfs.mountcmd",
    "demo": "unionfs.demo",
    "run": "runner.cli",
    "ps": "runner.images",
    "rm": "runner.images",
    "image": "runner.images",
    "diff": "runner.images",
    "commit": "runner.images",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0 if argv else 2
    command = argv[0]
    try:
        if command in COMMANDS:
            module = importlib.import_module(COMMANDS[command])
            return module.main(command, argv[1:]) or 0
        # mount(8) / containers-storage helper form: pyunion SOURCE MNT -o OPTS, pyunion -o OPTS MNT
        from unionfs import mountcmd

        return mountcmd.helper_main(argv) or 0
    except UsageError as e:
        print(f"pyunion: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
