"""Lists of memoryviews over guest buffers (scatter-gather lists), cut and filled without copies."""

from __future__ import annotations


def total_length(views: list[memoryview]) -> int:
    return sum(map(len, views))


def trim(views: list[memoryview], front: int, back: int = 0) -> list[memoryview]:
    """The views without their first `front` and last `back` bytes (headers, a status byte)."""
    out = []
    for view in views:
        if front >= len(view):
            front -= len(view)
            continue
        out.append(view[front:])
        front = 0
    while back and out:
        last = out.pop()
        if len(last) > back:
            out.append(last[: len(last) - back])
            back = 0
        else:
            back -= len(last)
    return out


def scatter(views: list[memoryview], data: bytes | bytearray | memoryview) -> int:
    """Copy `data` into the views in order; returns how many bytes fitted."""
    done = 0
    for view in views:
        take = min(len(view), len(data) - done)
        view[:take] = data[done : done + take]
        done += take
        if done == len(data):
            break
    return done
