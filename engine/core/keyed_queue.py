"""A waiting queue ordered by a key the policy computes once per request (smallest first).

The priority and deadline policies order waiting requests by keys that do not change while a
request waits (aged priority and deadlines both reduce to one), so a heap serves them in
O(log n) even with thousands waiting, which the simulator needs. Removal is lazy: an aborted
request is marked gone and skipped when it reaches the top. Same interface as FairQueue, so the
scheduler does not care which one a policy hands it.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Callable, Iterator, Mapping

from engine.core.request import Request


class KeyedQueue:
    def __init__(self, key: Callable[[Request], float]) -> None:
        self.key = key
        self._heap: list[tuple[float, int, Request]] = []
        self._by_id: dict[str, Request] = {}
        self._entry: dict[str, int] = {}  # request id -> its live heap entry's sequence number
        self._seq = itertools.count()

    def append(self, request: Request) -> None:
        seq = next(self._seq)
        heapq.heappush(self._heap, (self.key(request), seq, request))
        self._by_id[request.request_id] = request
        self._entry[request.request_id] = seq

    def rekey(self, request: Request) -> None:
        """Re-order a waiting request whose key changed (its old entry is skipped)."""
        self.append(request)

    def _top(self) -> Request:
        while True:
            _, seq, request = self._heap[0]
            if self._entry.get(request.request_id) == seq:
                return request
            heapq.heappop(self._heap)

    def peek(self, running: Mapping[str, int] | None = None) -> Request:
        return self._top()

    def popleft(self, running: Mapping[str, int] | None = None) -> Request:
        request = self._top()
        heapq.heappop(self._heap)
        del self._by_id[request.request_id]
        del self._entry[request.request_id]
        return request

    def remove(self, request: Request) -> None:
        del self._by_id[request.request_id]
        del self._entry[request.request_id]

    def find(self, request_id: str) -> Request | None:
        return self._by_id.get(request_id)

    def clear(self) -> None:
        self._heap.clear()
        self._by_id.clear()
        self._entry.clear()

    def __len__(self) -> int:
        return len(self._by_id)

    def __bool__(self) -> bool:
        return bool(self._by_id)

    def __iter__(self) -> Iterator[Request]:
        return iter(sorted(self._by_id.values(), key=self.key))
