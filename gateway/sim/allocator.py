"""KV-cache block allocators of the simulated GPU: paged (any free block will do) and contiguous
(one first-fit region per sequence in a linear block array, so free memory fragments).

Both count in blocks; callers convert to tokens (``block_size``) or bytes. Neither knows about
time or sequences: they hand out and take back blocks, and report how fragmented the free space is.
"""

from __future__ import annotations

import bisect


class PagedAllocator:
    """A pool of interchangeable blocks, as in vLLM's paged attention.

    Invariant: ``0 <= free_blocks <= total_blocks``. Because any free block serves any sequence,
    the largest allocation that can succeed is every free block, and fragmentation is always 0.
    """

    __slots__ = ("_free", "total_blocks")

    def __init__(self, total_blocks: int) -> None:
        if total_blocks <= 0:
            raise ValueError(f"total_blocks must be > 0, got {total_blocks}")
        self.total_blocks = total_blocks
        self._free = total_blocks

    @property
    def free_blocks(self) -> int:
        return self._free

    @property
    def used_blocks(self) -> int:
        return self.total_blocks - self._free

    @property
    def largest_free_blocks(self) -> int:
        return self._free

    def take(self, blocks: int) -> bool:
        """Take ``blocks`` blocks if that many are free; return whether it did (all or nothing)."""
        if blocks > self._free:
            return False
        self._free -= blocks
        return True

    def give_back(self, blocks: int) -> None:
        if blocks < 0 or self._free + blocks > self.total_blocks:
            raise ValueError(f"giving back {blocks} blocks would leave {self._free + blocks} free")
        self._free += blocks

    def reset(self) -> None:
        self._free = self.total_blocks


class ContiguousAllocator:
    """A linear array of blocks handing out one contiguous region per request, first fit.

    Free space is kept as sorted, non-overlapping ``(start, length)`` regions, and adjacent free
    regions are always merged, so "largest free region" is exactly what a new allocation can get.
    Regions are at most ``max_num_seqs + 1``, so the linear scans here stay short.
    """

    __slots__ = ("_free_len", "_free_starts", "_free_total", "_used", "total_blocks")

    def __init__(self, total_blocks: int) -> None:
        if total_blocks <= 0:
            raise ValueError(f"total_blocks must be > 0, got {total_blocks}")
        self.total_blocks = total_blocks
        self._free_starts: list[int] = [0]
        self._free_len: dict[int, int] = {0: total_blocks}
        self._free_total = total_blocks
        self._used: dict[int, int] = {}

    @property
    def free_blocks(self) -> int:
        return self._free_total

    @property
    def used_blocks(self) -> int:
        return self.total_blocks - self._free_total

    @property
    def largest_free_blocks(self) -> int:
        return max(self._free_len.values(), default=0)

    def free_regions(self) -> list[tuple[int, int]]:
        """The free regions as ``(start, length)`` in block order."""
        return [(s, self._free_len[s]) for s in self._free_starts]

    def allocate(self, blocks: int) -> int | None:
        """Return the start of the first free region of at least ``blocks`` blocks, now in use, or
        None when no single region is large enough (whatever the total free)."""
        if blocks <= 0:
            raise ValueError(f"an allocation needs at least one block, got {blocks}")
        for i, start in enumerate(self._free_starts):
            length = self._free_len[start]
            if length < blocks:
                continue
            del self._free_len[start]
            if length == blocks:
                del self._free_starts[i]
            else:
                self._free_starts[i] = start + blocks
                self._free_len[start + blocks] = length - blocks
            self._free_total -= blocks
            self._used[start] = blocks
            return start
        return None

    def release(self, start: int) -> None:
        """Free the region ``allocate`` returned at ``start``, merging it with free neighbours."""
        blocks = self._used.pop(start, None)
        if blocks is None:
            raise ValueError(f"no allocated region starts at block {start}")
        self._free_total += blocks
        i = bisect.bisect_left(self._free_starts, start)
        end = start + blocks
        if i < len(self._free_starts) and self._free_starts[i] == end:
            blocks += self._free_len.pop(end)
            del self._free_starts[i]
        if i > 0:
            prev = self._free_starts[i - 1]
            if prev + self._free_len[prev] == start:
                self._free_len[prev] += blocks
                return
        self._free_starts.insert(i, start)
        self._free_len[start] = blocks

    def reset(self) -> None:
        self._free_starts = [0]
        self._free_len = {0: self.total_blocks}
        self._free_total = self.total_blocks
        self._used = {}


def fragmentation_ratio(free_blocks: int, largest_free_blocks: int) -> float:
    """Share of free memory no single allocation can use: ``1 - largest / total free``, and 0 when
    nothing is free (a full cache is not fragmented, it is full)."""
    if free_blocks == 0:
        return 0.0
    return 1.0 - largest_free_blocks / free_blocks
