"""The waiting queue, fair across clients: the next free slot goes to the client with the
fewest requests running.

First come, first served lets one client that submits thousands of requests push every other
client's request behind all of its own. Here each client (a server session, or "" for the
embedded front doors) has its own first-come-first-served line. A free slot goes to the waiting
client that has the fewest requests running (ties: the one whose turn came longest ago), so a
client with one request waiting gets the next slot even while another holds all the rest, and
clients with equal shares alternate. A client alone sees plain FCFS.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Iterator, Mapping

from engine.core.request import Request


class FairQueue:
    def __init__(self) -> None:
        # client -> its waiting requests, in arrival order; the dict's order is the turn order
        self._lines: OrderedDict[str, deque[Request]] = OrderedDict()
        self._by_id: dict[str, Request] = {}

    def append(self, request: Request) -> None:
        line = self._lines.get(request.client)
        if line is None:
            line = self._lines[request.client] = deque()
        line.append(request)
        self._by_id[request.request_id] = request

    def peek(self, running: Mapping[str, int]) -> Request:
        """The request popleft(running) would return; `running`: requests running per client."""
        return self._lines[self._next_client(running)][0]

    def popleft(self, running: Mapping[str, int]) -> Request:
        """The oldest request of the client with the fewest running (then: longest since its
        turn); that client goes to the back of the turn order."""
        client = self._next_client(running)
        line = self._lines[client]
        request = line.popleft()
        if line:
            self._lines.move_to_end(client)
        else:
            del self._lines[client]
        del self._by_id[request.request_id]
        return request

    def _next_client(self, running: Mapping[str, int]) -> str:
        return min(self._lines, key=lambda client: running.get(client, 0))  # min keeps the first of ties

    def remove(self, request: Request) -> None:
        line = self._lines[request.client]
        line.remove(request)
        if not line:
            del self._lines[request.client]
        del self._by_id[request.request_id]

    def find(self, request_id: str) -> Request | None:
        return self._by_id.get(request_id)

    def count(self, client: str) -> int:
        line = self._lines.get(client)
        return 0 if line is None else len(line)

    def clear(self) -> None:
        self._lines.clear()
        self._by_id.clear()

    def __len__(self) -> int:
        return len(self._by_id)

    def __bool__(self) -> bool:
        return bool(self._by_id)

    def __iter__(self) -> Iterator[Request]:
        for line in list(self._lines.values()):
            yield from list(line)
