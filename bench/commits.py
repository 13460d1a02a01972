"""The commit workload's client: N small SQLite transactions, each committed (and so fsynced).

Usage: python commits.py DATABASE N
"""

import sqlite3
import sys


def main() -> None:
    path, count = sys.argv[1], int(sys.argv[2])
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE row (id INTEGER PRIMARY KEY, value TEXT)")
    for i in range(count):
        with db:  # one transaction: the journal is written, synced, applied and removed
            db.execute("INSERT INTO row VALUES (?, ?)", (i, f"value {i}" * 10))
    db.close()


if __name__ == "__main__":
    main()
