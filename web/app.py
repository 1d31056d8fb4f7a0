"""The aiohttp application factory: one app per Runtime, its routes and middlewares."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from daemon.integrations.base import CALLBACK_DEPS
from daemon.runtime import RUNTIME, Runtime
from web import admin, admin_api, api, bodies, dialplan, health, middlewares, openapi
from web.auth import admin_prefix
from web.templating import TEMPLATES, environment

MAX_BODY_BYTES = 1024 * 1024


def create_app(runtime: Runtime) -> web.Application:
    """The whole HTTP surface of one process."""
    app = web.Application(
        middlewares=[middlewares.measure, middlewares.errors, bodies.refuse_malformed],
        client_max_size=MAX_BODY_BYTES,
    )
    app[RUNTIME] = runtime
    templates: Path | None = runtime.adapter.templates_dir()
    app[TEMPLATES] = environment(templates)
    app.add_routes(health.routes)
    app.add_routes(api.routes)
    app.add_routes(admin_api.service_routes())
    app.add_routes(openapi.routes)
    app.add_routes(dialplan.routes)
    callbacks = runtime.adapter.routes()
    if callbacks:
        sub = web.Application()
        sub[CALLBACK_DEPS] = runtime.callback_deps()
        sub.add_routes(callbacks)
        app.add_subapp(f"/{runtime.adapter.name}/", sub)
    pages = admin.create(admin_prefix(runtime))
    pages[RUNTIME] = runtime
    app.add_subapp(admin_prefix(runtime) + "/", pages)
    return app
