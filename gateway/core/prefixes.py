"""Which prompt prefixes a backend with prefix caching likely holds, and so how much of a new
prompt it will not compute or store again. Pure.

vLLM (automatic prefix caching, on by default since its V1 engine) and SGLang (its radix cache)
keep the KV blocks of earlier prompts and reuse them for a prompt that starts with the same
tokens: those cost no prefill and no new memory. Priced whole, a request that shares a long
system prompt is charged several times what it takes, in its reservation, in its tenant's fair
share and in the queue's densest-first order, so such tenants lose their share to tenants
without one.

The gateway cannot see a backend's cache; it remembers what it sent there. A prompt's text, in
UTF-8, is cut into chunks of ``CHUNK_BYTES`` and each chunk's hash is the CRC-32 of all the text
up to its end (a chain: a chunk matches only after the same text before it, as a backend's block
hashes do; a collision only makes one estimate optimistic, which the gauge corrects). The
chains of prompts placed on a backend are kept, most recently used last, up to as many chunks as
its KV cache holds (the cache cannot keep more; it may keep less under pressure, which the usage
gauge and the overcommit factor then correct). A request's cached share is its leading chunks
found there, never its whole prompt: the backend computes at least the last token.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Iterable

CHUNK_BYTES = 256
"""Bytes per hashed chunk: about 64 tokens of English, four of vLLM's 16-token blocks. A prefix
is recognised to within one chunk. A 10 kB prompt's chain costs about 25 µs here (1024-byte
chunks: 11 µs; CRC-32 itself is about half of it), paid only where the backend caches."""


def prompt_chain(texts: Iterable[str]) -> tuple[int, ...]:
    """Chained hashes of the full ``CHUNK_BYTES`` chunks of the texts joined in order (a partial
    last chunk is the prompt's own, never shared)."""
    data = memoryview("".join(texts).encode())
    chain: list[int] = []
    crc = 0
    for start in range(0, len(data) - CHUNK_BYTES + 1, CHUNK_BYTES):
        crc = zlib.crc32(data[start : start + CHUNK_BYTES], crc)
        chain.append(crc)
    return tuple(chain)


class PrefixIndex:
    """The chunk hashes recently sent to one backend, bounded by what its cache can hold."""

    __slots__ = ("_seen", "capacity")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity  # chunks
        self._seen: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def cached_chunks(self, chain: tuple[int, ...]) -> int:
        """Leading chunks of ``chain`` the backend likely still holds."""
        seen = self._seen
        for i, h in enumerate(chain):
            if h not in seen:
                return i
        return len(chain)

    def remember(self, chain: tuple[int, ...]) -> None:
        """A prompt of this chain was sent: its chunks are the most recently used."""
        seen = self._seen
        for h in chain:
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self.capacity:
            seen.popitem(last=False)
