"""The caches of rendered reports: a byte-bounded LRU in memory and digest-checked files on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from exitwise.policies.report.cache import DiskCache, MemoryCache


def test_memory_cache_is_bounded_by_bytes_and_least_recently_used_goes_first() -> None:
    cache = MemoryCache(max_bytes=250)
    for name in "abc":
        cache.put(name, name.encode() * 100)
    assert cache.get("a") is None and cache.size <= 250  # a was evicted for c
    assert cache.get("b") is not None  # b is now the most recently used
    cache.put("d", b"d" * 100)
    assert (cache.get("b"), cache.get("c")) == (b"b" * 100, None)
    cache.put("huge", b"x" * 251)  # larger than the whole budget: not kept, nothing evicted
    assert cache.get("huge") is None and cache.get("d") == b"d" * 100


def test_disk_cache_verifies_its_digest_and_prunes_the_oldest(tmp_path: Path) -> None:
    disk = DiskCache(tmp_path / "cache", max_bytes=2_000)
    k1, k2, k3 = ("1" * 64, "2" * 64, "3" * 64)
    path = disk.put(k1, "pdf", b"%PDF one" * 100)
    assert path is not None and disk.get(k1, "pdf") == b"%PDF one" * 100
    raw = path.read_bytes()
    path.write_bytes(raw[:-1] + b"X")  # one byte of the body changed
    assert disk.get(k1, "pdf") is None and not path.exists() and disk.corrupt == 1
    disk.put(k2, "pdf", b"2" * 900)
    os.utime(disk.path(k2, "pdf"), (1, 1))  # the oldest
    disk.put(k3, "pdf", b"3" * 900)
    disk.put(k1, "html", b"1" * 900)
    assert disk.get(k2, "pdf") is None and disk.get(k3, "pdf") == b"3" * 900  # pruned to 2,000 bytes
    with pytest.raises(ValueError, match="64 lower-case hex"):
        disk.path("../../etc/passwd", "pdf")
