"""README's main command: the demo runs and shows a copy-up and a whiteout on disk."""

from conftest import pyunion


def test_demo_shows_copy_up_and_whiteout():
    r = pyunion("demo")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert ".wh.README" in out
    assert "etc/hosts                    '127.0.0.1 localhost | 10.0.0.1 db'" in out
    lower = out.split("lower branch on disk")[1]
    assert "README" in lower and "10.0.0.1" not in lower
