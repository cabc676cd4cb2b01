"""The request gate alone: each thread model admits exactly what it promises, in arrival order."""

from __future__ import annotations

import threading

import pytest

from nbdserver.gate import RequestGate
from qcow2.contract import Access, ThreadModel

R, F, W = Access.READ, Access.FLUSH, Access.WRITE


def admits(model: ThreadModel, held: list[Access], new: Access) -> bool:
    gate = RequestGate(model)
    for access in held:
        assert gate.enter(access, wait=False)
    return gate.enter(new, wait=False)


@pytest.mark.parametrize(
    ("held", "new", "parallel_reads"),
    [
        ([], R, True),
        ([], W, True),
        ([R], R, True),
        ([R, R], F, True),
        ([R], W, False),
        ([F], R, True),
        ([F], F, False),
        ([F], W, False),
        ([W], R, False),
        ([W], F, False),
    ],
)
def test_what_each_model_admits(held, new, parallel_reads) -> None:
    assert admits(ThreadModel.PARALLEL_READS, held, new) == parallel_reads
    assert admits(ThreadModel.SERIALIZE_ALL_REQUESTS, held[:1], new) == (not held)  # one call at a time
    assert admits(ThreadModel.PARALLEL, held, new)


def test_a_waiting_write_is_not_overtaken_by_later_reads() -> None:
    gate = RequestGate(ThreadModel.PARALLEL_READS)
    assert gate.enter(R)
    order: list[str] = []

    def writer() -> None:
        with gate.entered(W):
            order.append("write")

    t = threading.Thread(target=writer)
    t.start()
    assert gate.wait_for_waiters(1, 5)
    assert not gate.enter(R, wait=False), "a read arriving after a waiting write must not pass it"
    reader = threading.Thread(target=lambda: (gate.enter(R), order.append("read"), gate.leave(R)))
    reader.start()
    assert gate.wait_for_waiters(2, 5)
    gate.leave(R)  # the first read ends: the write goes first, then the read
    t.join(5)
    reader.join(5)
    assert order == ["write", "read"]
    assert not gate.busy()


def test_reads_really_run_together() -> None:
    gate = RequestGate(ThreadModel.PARALLEL_READS)
    both_inside = threading.Barrier(2, timeout=5)

    def read() -> None:
        with gate.entered(R):
            both_inside.wait()  # breaks (BrokenBarrierError) unless both are inside at once

    threads = [threading.Thread(target=read) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert not both_inside.broken and not gate.busy()
