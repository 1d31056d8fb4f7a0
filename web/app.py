"""The aiohttp application factory: one app per Runtime, its routes and middlewares."""

from __future__ import annotations

from aiohttp import web

from daemon.integrations.base import CALLBACK_DEPS
from daemon.runtime import RUNTIME, Runtime
from web import api, dialplan, health, middlewares

MAX_BODY_BYTES = 1024 * 1024


def create_app(runtime: Runtime) -> web.Application:
    """The whole HTTP surface of one process."""
    app = web.Application(
        middlewares=[middlewares.measure, middlewares.errors],
        client_max_size=MAX_BODY_BYTES,
    )
    app[RUNTIME] = runtime
    app.add_routes(health.routes)
    app.add_routes(api.routes)
    app.add_routes(dialplan.routes)
    callbacks = runtime.adapter.routes()
    if callbacks:
        sub = web.Application()
        sub[CALLBACK_DEPS] = runtime.callback_deps()
        sub.add_routes(callbacks)
        app.add_subapp(f"/{runtime.adapter.name}/", sub)
    return app
