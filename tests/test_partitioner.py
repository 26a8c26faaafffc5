"""Keys land where Kafka's Java clients put them (vectors from Kafka's UtilsTest.testMurmur2)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from assured.log import murmur2, partition_for_key
from assured.log.partitioner import murmur2_python

JAVA_MURMUR2 = [
    ("21", -973932308),
    ("foobar", -790332482),
    ("a-little-bit-long-string", -985981536),
    ("a-little-bit-longer-string", -1486304829),
    ("lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
    ("abc", 479470107),
]


@pytest.mark.parametrize(("key", "expected"), JAVA_MURMUR2)
@pytest.mark.parametrize("hash_of", [murmur2, murmur2_python], ids=["cached", "python"])
def test_murmur2_matches_java(key: str, expected: int, hash_of: Callable[[bytes], int]) -> None:
    assert hash_of(key.encode()) == expected


@given(st.binary(max_size=300))
def test_the_cached_hash_agrees_with_the_python_one(key: bytes) -> None:
    assert murmur2(key) == murmur2_python(key)
    assert murmur2(key) == murmur2_python(key)  # from the cache the second time


def test_a_key_in_a_mutable_buffer_is_hashed_not_remembered() -> None:
    """Untyped callers pass a bytearray now and then: it is hashed, not refused."""
    mutable: Any = bytearray(b"21")
    assert murmur2(mutable) == -973932308
    mutable[0:2] = b"ab"
    assert murmur2(mutable) == murmur2(b"ab")
    view: Any = memoryview(mutable)  # unhashable with ValueError, not TypeError
    assert murmur2(view) == murmur2(b"ab")


def test_the_cache_is_bounded() -> None:
    """Keys that never repeat (ids) must not grow the process without end."""
    from assured.log import partitioner

    most = 0
    for i in range(40_000):
        key = b"unique-%d" % i
        assert murmur2(key) == murmur2_python(key)
        most = max(most, len(partitioner._SEEN))
    assert most == partitioner._SEEN_MOST == 16_384
    assert len(partitioner._SEEN) <= partitioner._SEEN_MOST


def test_partition_is_the_positive_hash_modulo_partitions() -> None:
    # -973932308 & 0x7fffffff = 1173551340
    assert partition_for_key(b"21", 7) == 1173551340 % 7
    assert partition_for_key(b"abc", 10) == 479470107 % 10


@given(st.binary(max_size=64), st.integers(min_value=1, max_value=1000))
def test_partition_is_in_range_and_stable(key: bytes, partitions: int) -> None:
    p = partition_for_key(key, partitions)
    assert 0 <= p < partitions
    assert partition_for_key(key, partitions) == p
    assert -(2**31) <= murmur2(key) < 2**31


def test_zero_partitions_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one partition"):
        partition_for_key(b"k", 0)
