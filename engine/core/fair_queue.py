"""The waiting queue, fair across clients: admission takes turns between them.

First come, first served lets one client that submits thousands of requests push every other
client's request behind all of its own. Here each client (a server session, or "" for the
embedded front doors) has its own first-come-first-served line, and admission visits the lines
in turn, one request each. A client alone sees plain FCFS; two clients get alternating slots
however many requests either has queued.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Iterator

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

    def peek(self) -> Request:
        """The request popleft() would return."""
        return next(iter(self._lines.values()))[0]

    def popleft(self) -> Request:
        """The oldest request of the client whose turn it is; that client goes to the back."""
        client, line = next(iter(self._lines.items()))
        request = line.popleft()
        if line:
            self._lines.move_to_end(client)
        else:
            del self._lines[client]
        del self._by_id[request.request_id]
        return request

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
