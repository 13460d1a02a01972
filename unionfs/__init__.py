"""pyunion's union filesystem: a FUSE-free semantics engine under a thin pyfuse3 adapter."""
