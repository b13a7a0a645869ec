"""Automatic prefix caching on a paged KV cache, as vLLM's: a full block is known by the hash of
its tokens chained with its parent block's, so a prompt that starts like one already in memory
can hold the same blocks instead of computing them again.

A cached block stays cached after the last sequence holding it lets go: it is then *evictable*,
free memory that still holds data, and the allocator reuses it only when no empty block is left,
the least recently freed first. Free counts include evictable blocks, as vLLM's free-block queue
does, so caching never makes a request wait for memory.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from gateway.sim.allocator import PagedAllocator


class PrefixCachingAllocator(PagedAllocator):
    """A paged pool whose full blocks may carry a content hash.

    Every block is exactly one of: held (by one or more sequences; a hashed one once however many
    share it), evictable (hashed, held by none) or empty. ``free_blocks`` counts evictable and
    empty ones, and ``used_blocks + free_blocks == total_blocks``. A held block is never evicted.
    """

    __slots__ = ("_evictable", "_held")

    def __init__(self, total_blocks: int) -> None:
        super().__init__(total_blocks)
        self._held: dict[int, int] = {}  # hash -> sequences holding that block, >= 1
        self._evictable: OrderedDict[int, None] = OrderedDict()  # least recently freed first

    @property
    def evictable_blocks(self) -> int:
        return len(self._evictable)

    @property
    def held_hashed_blocks(self) -> int:
        """Hashed blocks some sequence holds, each counted once."""
        return len(self._held)

    def lookup(self, hashes: Sequence[int]) -> tuple[int, int]:
        """How many leading blocks of ``hashes`` are resident, and how many of those evictable."""
        evictable = 0
        for i, block_hash in enumerate(hashes):
            if block_hash in self._held:
                continue
            if block_hash not in self._evictable:
                return i, evictable
            evictable += 1
        return len(hashes), evictable

    def take(self, blocks: int) -> bool:
        """Take ``blocks`` empty blocks, evicting the least recently freed cached ones when the
        empty ones run out; all or nothing."""
        if not super().take(blocks):
            return False
        while len(self._evictable) > self._free:
            self._evictable.popitem(last=False)
        return True

    def take_with_prefix(self, hit: Sequence[int], new: int) -> int | None:
        """Hold the resident blocks ``hit`` (a ``lookup``'s leading ones) and ``new`` empty
        blocks, all or nothing. Returns how many of ``hit`` other sequences already held, or
        None when the free blocks (the evictable ones in ``hit`` included) are too few."""
        reviving = sum(1 for block_hash in hit if block_hash in self._evictable)
        if reviving + new > self._free:
            return None
        shared = 0
        for block_hash in hit:
            holders = self._held.get(block_hash, 0)
            if holders:
                shared += 1
            else:
                del self._evictable[block_hash]
                self._free -= 1
            self._held[block_hash] = holders + 1
        self.take(new)
        return shared

    def register(self, block_hash: int) -> bool:
        """A block its sequence holds has just filled up with content hashing to ``block_hash``:
        cache it, unless a block of that hash is resident already (then it stays private, as a
        sequence that recomputed a cached block keeps its own copy)."""
        if block_hash in self._held or block_hash in self._evictable:
            return False
        self._held[block_hash] = 1
        return True

    def release(self, hashed: Sequence[int], private: int) -> int:
        """A sequence lets go of its hashed blocks ``hashed`` (in its block order) and of
        ``private`` unhashed ones. Its last blocks become the first to be evicted, as in vLLM,
        so a shared head outlives a sequence's own tail. Returns how many of ``hashed`` other
        sequences still hold."""
        still = 0
        for block_hash in reversed(hashed):
            holders = self._held[block_hash] - 1
            if holders:
                self._held[block_hash] = holders
                still += 1
            else:
                del self._held[block_hash]
                self._evictable[block_hash] = None
        self.give_back(private + len(hashed) - still)
        return still

    def reset(self) -> None:
        super().reset()
        self._held.clear()
        self._evictable.clear()
