"""The route stage: a router's routes of many requests, as a ``RouteTable``.

Routers take a batch of requests and embed or classify it at once. With an executor that keeps
a model loaded from one call to the next (a router may generate: skill keywords), the requests
go in blocks of ``ROUTE_BLOCK``, so the ``Route`` objects of 100,000 requests are never all held
at once; the table keeps a few bytes a route.
"""

from __future__ import annotations

import time
from typing import Callable

from coe.core.request import Request
from coe.pipeline.routes import RouteTable
from coe.routing import Router

#: requests routed by one ``Router.route`` call at most, when the executor keeps models
#: loaded from one call to the next
ROUTE_BLOCK = 8192


def route(router: Router, requests: list[Request], names: list[str], *, blocks: bool = True,
          unknown: Callable[[str], object] | None = None) -> tuple[RouteTable, float]:
    """The routes of ``requests`` (experts as indices into ``names``) and the seconds the
    router took. ``unknown(name)`` raises the caller's error for a recruit outside the pool."""
    ids = [q.id for q in requests]
    n = len(requests)
    step = ROUTE_BLOCK if blocks else max(n, 1)
    tables, seconds = [], 0.0
    for start in range(0, n, step):
        t0 = time.perf_counter()
        routes = router.route(requests[start:start + step])
        seconds += time.perf_counter() - t0
        tables.append(RouteTable.of(ids[start:start + step], names, routes, unknown=unknown))
    if not tables:
        tables.append(RouteTable.of([], names, []))
    return RouteTable.concat(ids, tables), seconds
