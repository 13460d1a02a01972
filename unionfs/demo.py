"""`pyunion demo`: two sample branches merged, a copy-up and a whiteout shown on disk."""

import os
import subprocess
import sys
import tempfile
import time

from unionfs.errors import UsageError


def _show(title: str, root: str) -> None:
    print(f"  {title}")
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if name == ".wh..wh.pyunion":
                print(f"    {rel}/{'':<12} (the work area for copy-ups, hidden in the merged view)")
            elif os.path.isdir(path):
                print(f"    {rel}/")
            else:
                with open(path, "rb") as f:
                    data = f.read(60).decode(errors="replace").strip().replace("\n", " | ")
                print(f"    {rel:<28} {data!r}" if data else f"    {rel:<28} (empty)")


def _run(*args: str) -> None:
    res = subprocess.run([sys.executable, "-m", "unionfs", *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise UsageError(res.stderr.strip() or f"pyunion {args[0]} failed")


def main(command: str, argv: list[str]) -> int:
    if argv:
        raise UsageError("usage: pyunion demo")
    with tempfile.TemporaryDirectory(prefix="pyunion-demo-") as base:
        upper, lower, mnt = (os.path.join(base, d) for d in ("upper", "lower", "merged"))
        for d in (upper, lower, mnt, os.path.join(lower, "etc"), os.path.join(upper, "etc")):
            os.makedirs(d, exist_ok=True)
        files = {
            (lower, "etc/motd"): "welcome from the lower (read-only) branch\n",
            (lower, "etc/hosts"): "127.0.0.1 localhost\n",
            (lower, "README"): "shipped in the lower branch\n",
            (upper, "etc/motd"): "the upper branch overrides this one\n",
            (upper, "notes"): "only in the upper branch\n",
        }
        for (root, rel), text in files.items():
            with open(os.path.join(root, rel), "w") as f:
                f.write(text)
        print(f"$ pyunion mount {upper}=rw:{lower}=ro+wh {mnt}")
        _run("mount", f"{upper}=rw:{lower}=ro+wh", mnt)
        try:
            _show("merged view (upper wins, directories merge):", mnt)
            print("\n$ echo '10.0.0.1 db' >> merged/etc/hosts      # a write to a lower file")
            with open(os.path.join(mnt, "etc/hosts"), "a") as f:
                f.write("10.0.0.1 db\n")
            print("$ rm merged/README                            # a delete of a lower file")
            os.unlink(os.path.join(mnt, "README"))
            _show("merged view now:", mnt)
            print()
            _show("upper branch on disk (copy-up of etc/hosts, whiteout .wh.README):", upper)
            _show("lower branch on disk (never modified):", lower)
        finally:
            print(f"\n$ pyunion umount {mnt}")
            for _ in range(50):
                try:
                    _run("umount", mnt)
                    break
                except UsageError:
                    time.sleep(0.1)
    return 0
