"""How far a paged backend's reservations may exceed its usable KV memory, learned from the
backend's own usage gauge and preemption counter.

A paged server (vLLM, SGLang) grows a sequence's KV blocks as it decodes, so at any moment a
request holds its prompt plus what it has produced so far, about half of its final output on
average, while admission reserves its whole likely size (prompt + a high quantile of output
lengths). Counting reservations alone keeps such a GPU half full. So each scrape nudges a factor
on the planned capacity: up (additively) while the gateway is bound by its reservations, the
measured usage is below target and the backend has no queue of its own; down (multiplicatively)
when the backend preempts, and additively while usage is above target. Until its first step
down it grows multiplicatively instead (slow start, as TCP's): before the gateway has seen any
output it reserves each request's whole ``max_tokens``, several times what it holds, and a tenth
a scrape kept the overload scenario's cache below two thirds full for three seconds (with 1.25x
a scrape it was four fifths full after 1.5 s). Requests waiting inside the backend hold no KV
yet, so a low gauge then says nothing of the reservations' size (on a CPU vLLM that prefills a
few prompts a second the factor rose to 2 within 5 s and let a whole burst in). It never goes
below 1: reservations are then an upper bound of real usage, as for contiguous backends, which
never overcommit. Between scrapes the usage gauge itself bounds what is admitted
(``BackendRuntime.view``), so a wrong factor costs at most one scrape interval of admissions.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Overcommit:
    max_factor: float = 4.0
    step: float = 0.1  # added or removed per scrape
    cut: float = 0.8  # multiplied on a preemption
    margin: float = 0.05  # grow only while usage is this far below target
    bound_share: float = 0.9  # "bound by reservations": holding this share of the plan
    slow_start: float = 1.25  # multiplied per scrape until the first step down
    value: float = 1.0
    probing: bool = True  # no step down yet: grow by ``slow_start``

    def observe(
        self,
        *,
        usage: float,
        target: float,
        reserved_share: float,
        preempted: bool,
        backend_queue: bool = False,
    ) -> None:
        """One scrape: ``usage`` of the whole KV cache measured by the backend, ``target`` the
        usage to aim for (1 - headroom), ``reserved_share`` = reserved bytes / planned bytes,
        ``backend_queue``: requests wait inside the backend (its own waiting gauge)."""
        if preempted:
            self.probing = False
            self.value = max(1.0, self.value * self.cut)
        elif usage > target:
            self.probing = False
            self.value = max(1.0, self.value - self.step)
        elif (
            usage < target - self.margin
            and reserved_share >= self.bound_share
            and not backend_queue
        ):
            grown = self.value * self.slow_start if self.probing else self.value + self.step
            self.value = min(self.max_factor, grown)
