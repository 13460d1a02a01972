"""Benchmarks of pyunion against a native copy, kernel overlayfs, fuse-overlayfs and unionfs-fuse."""
