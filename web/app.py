"""The aiohttp application factory: one app per Runtime, its routes and middlewares."""

from __future__ import annotations

from aiohttp import web

from daemon.runtime import RUNTIME, Runtime
from web import api, bodies, health, middlewares

MAX_BODY_BYTES = 1024 * 1024


def create_app(runtime: Runtime) -> web.Application:
    """The whole HTTP surface of one process."""
    app = web.Application(
        middlewares=[middlewares.measure, middlewares.errors, bodies.refuse_malformed],
        client_max_size=MAX_BODY_BYTES,
    )
    app[RUNTIME] = runtime
    app.add_routes(health.routes)
    app.add_routes(api.routes)
    callbacks = runtime.adapter.routes()
    if callbacks:
        sub = web.Application()
        sub[RUNTIME] = runtime
        sub.add_routes(callbacks)
        app.add_subapp(f"/{runtime.adapter.name}/", sub)
    return app
