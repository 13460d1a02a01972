"""pyunion's container runner and image store, built on the union filesystem."""
