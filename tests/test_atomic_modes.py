"""Atomic writes leave the permissions of a file written in place (the umask's), not mkstemp's 0600 /
mkdtemp's 0700: a run directory, an adapter or a merged model must be readable by a server running as
another user, as ``save_pretrained``'s output is."""

import os
import stat

import pytest

from lorakit.atomic import atomic_dir, atomic_write


@pytest.fixture
def umask():
    def set_(mask):
        os.umask(mask)

    old = os.umask(0o022)
    yield set_
    os.umask(old)


def _mode(p):
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_write_mode_follows_umask(tmp_path, umask, mask):
    umask(mask)
    atomic_write(tmp_path / "a.json", lambda fh: fh.write(b"{}"))
    assert _mode(tmp_path / "a.json") == 0o666 & ~mask
    atomic_write(tmp_path / "a.json", lambda fh: fh.write(b"[]"))  # replacing keeps it
    assert _mode(tmp_path / "a.json") == 0o666 & ~mask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_atomic_dir_mode_follows_umask(tmp_path, umask, mask):
    umask(mask)

    def fill(d):
        (d / "w.bin").write_bytes(b"x")
        atomic_write(d / "c.json", lambda fh: fh.write(b"{}"))

    atomic_dir(tmp_path / "out", fill)
    assert _mode(tmp_path / "out") == 0o777 & ~mask
    assert _mode(tmp_path / "out" / "c.json") == 0o666 & ~mask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
