"""`stepweave gateway`: one stateless HTTP front door over several `stepweave serve` engine servers.

Each engine server is reached through one `AsyncEngineClient` (ipc or tcp, with its token and
CURVE key). A request goes to the healthy engine serving its model with the fewest requests
outstanding from this gateway (ties taken in turn). Engines are pinged every `health_interval_s`;
one that does not answer, or whose connection drops, is skipped until it answers again. When an
engine dies its in-flight requests get 503 at once (the client's connection notices the drop)
and new requests go to the others. The gateway holds no request state beyond its open
connections, so several can run behind any HTTP load balancer.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from pathlib import Path
from typing import AsyncIterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from engine.contract.errors import EngineDeadError, OverloadedError, ServerUnavailableError
from engine.contract.input_images import MAX_INPUT_PIXELS
from engine.contract.outputs import RequestOutput
from engine.contract.sampling_params import SamplingParams
from engine.http.metrics import ServiceMetrics
from engine.request_outcome import outcome_of
from engine.service.client import AsyncEngineClient

log = logging.getLogger("stepweave.gateway")


class EngineRoute:
    """One engine server as the gateway sees it."""

    def __init__(self, address: str, client: AsyncEngineClient):
        self.address = address
        self.client = client
        self.healthy = False
        self.model: str | None = None
        self.outstanding = 0
        self.routed = 0  # requests sent here so far


class GatewayBackend:
    # Uploads are decoded here up to the largest input any engine may take; each engine server
    # then applies its own --max-input-pixels, and its refusal names the field the same way.
    max_input_pixels = MAX_INPUT_PIXELS

    def __init__(
        self,
        addresses: list[str],
        *,
        auth_token: str | None = None,
        server_keys: list[str | Path | None] | None = None,
        timeout_s: float = 5.0,
        health_interval_s: float = 0.5,
        metrics: ServiceMetrics | None = None,
    ):
        keys = server_keys if server_keys else [None] * len(addresses)
        self.routes = [
            EngineRoute(address, AsyncEngineClient(address, auth_token, server_key=key, timeout_s=timeout_s))
            for address, key in zip(addresses, keys)
        ]
        self.health_interval_s = health_interval_s
        self.metrics = metrics
        self._turn = itertools.count()
        self._health_tasks: list[asyncio.Task] = []
        if metrics is not None:
            metrics.registry.register(_RoutesCollector(self.routes))

    async def start(self) -> None:
        """Check every engine once, then keep checking in the background."""
        await asyncio.gather(*(self._check(route) for route in self.routes))
        # one loop per engine: a dead one's slow checks (timeout_s each) never delay the others'
        self._health_tasks = [asyncio.create_task(self._health_loop(route)) for route in self.routes]

    async def close(self) -> None:
        for task in self._health_tasks:
            task.cancel()
        await asyncio.gather(*self._health_tasks, return_exceptions=True)
        for route in self.routes:
            await route.client.close()

    # -- the backend the HTTP app uses ------------------------------------------------------
    def models(self) -> list[str]:
        return sorted({route.model for route in self.routes if route.model is not None})

    @property
    def serving(self) -> bool:
        return any(route.healthy for route in self.routes)

    def track(self, task: asyncio.Task) -> None:
        """Nothing to drain here: the engine servers own their requests."""

    async def generate(self, model: str, prompt: dict, params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """The outputs of one engine server. A request whose engine is lost before it sent
        anything back (it died, or was not yet known to be dead when this request was routed)
        goes to the next engine; once outputs have flowed, losing the engine is a 503."""
        outcome, final, tried = "aborted", None, set()
        try:
            while True:
                route = self._pick(model, tried)
                tried.add(route.address)
                route.outstanding += 1
                route.routed += 1
                started = False
                try:
                    async for output in route.client.generate(prompt, params, raise_when_lost=True):
                        started = True
                        if output.finished:
                            outcome, final = outcome_of(output), output
                        yield output
                    return
                except ServerUnavailableError as exc:
                    route.healthy = False  # until it answers a health check again
                    log.warning("engine server %s is unavailable: %s", route.address, exc)
                    if started or not self._has_other(model, tried):
                        outcome = "failed"
                        raise EngineDeadError(
                            f"the engine server handling this request is unavailable: {exc}"
                        ) from None
                finally:
                    route.outstanding -= 1
        except ValueError:
            outcome = "rejected"
            raise
        except OverloadedError:
            outcome = "overloaded"
            raise
        finally:
            if self.metrics is not None:
                self.metrics.observe_request(outcome, final)

    def _pick(self, model: str, tried: set[str]) -> EngineRoute:
        candidates = [r for r in self.routes if r.healthy and r.model == model and r.address not in tried]
        if not candidates:
            raise EngineDeadError(f"no engine server serving {model!r} is available")
        turn = next(self._turn)
        # fewest outstanding first; among equals, take them in turn
        return min(candidates, key=lambda r: (r.outstanding, (self.routes.index(r) - turn) % len(self.routes)))

    def _has_other(self, model: str, tried: set[str]) -> bool:
        return any(r.healthy and r.model == model and r.address not in tried for r in self.routes)

    # -- health -------------------------------------------------------------------------------
    async def _health_loop(self, route: EngineRoute) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            await self._check(route)

    async def _check(self, route: EngineRoute) -> None:
        try:
            healthy = await route.client.health()
            if healthy and route.model is None:
                route.model = await route.client.served_model()
        except Exception as exc:  # a failed check is an unhealthy engine, never a dead gateway
            log.debug("health check of %s failed: %s", route.address, exc)
            healthy = False
        if healthy != route.healthy:
            log.info("engine server %s is %s", route.address, "up" if healthy else "down")
        route.healthy = healthy


class _RoutesCollector:
    def __init__(self, routes: list[EngineRoute]):
        self.routes = routes

    def collect(self):
        up = GaugeMetricFamily(
            "stepweave_engine_up", "1 while the engine server answers health checks", labels=["engine"]
        )
        outstanding = GaugeMetricFamily(
            "stepweave_gateway_outstanding_requests", "Requests this gateway has in flight", labels=["engine"]
        )
        routed = CounterMetricFamily(
            "stepweave_gateway_routed_requests", "Requests sent to each engine", labels=["engine"]
        )
        for route in self.routes:
            up.add_metric([route.address], 1 if route.healthy else 0)
            outstanding.add_metric([route.address], route.outstanding)
            routed.add_metric([route.address], route.routed)
        yield from (up, outstanding, routed)
