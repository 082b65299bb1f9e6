"""Page-sized rows for pages in transit: the FT primary gathers scattered pages into them before
sending, the FT standby receives a sync's pages into them until it commits."""

from __future__ import annotations

import numpy as np

from pykvm.memory import PAGE_SIZE

CHUNK_PAGES = 4096  # the arena grows by 16 MiB chunks


class PageArena:
    """Hands out rows in order and takes them all back at once with `reset()`. Its chunks are kept
    from one use to the next, so their memory is faulted in only once, not at every sync."""

    def __init__(self) -> None:
        self._chunks: list[np.ndarray] = []
        self._chunk, self._used = 0, 0  # where the next free row is

    def take(self, count: int) -> np.ndarray:
        """`count` consecutive rows, a (count, PAGE_SIZE) uint8 array, valid until `reset()`."""
        if count > CHUNK_PAGES:  # too big to share a chunk: an array of its own, freed once dropped
            return np.empty((count, PAGE_SIZE), dtype=np.uint8)
        if self._chunk < len(self._chunks) and self._used + count > CHUNK_PAGES:
            self._chunk, self._used = self._chunk + 1, 0
        if self._chunk == len(self._chunks):
            self._chunks.append(np.empty((CHUNK_PAGES, PAGE_SIZE), dtype=np.uint8))
        rows = self._chunks[self._chunk][self._used : self._used + count]
        self._used += count
        return rows

    def reset(self) -> None:
        """Every row handed out is free again (their contents are no longer needed)."""
        self._chunk = self._used = 0
