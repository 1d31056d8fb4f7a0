"""Server-rendered pages: one jinja2 environment per application, autoescaped.

Templates are looked up in the adapter's own folder first (``Adapter.templates_dir``: the
parts only that CRM has, such as its connection form), then in ``web/templates`` (the base
layout and the CRM-neutral pages). Autoescaping is on for every template, so anything a CRM
or a user sent (a manager named ``<script>…``) renders as text. The environment is built once
per application and kept on it (``TEMPLATES``): nothing at module level.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import jinja2
from aiohttp import web

HERE: Final = Path(__file__).parent
TEMPLATE_DIR: Final = HERE / "templates"
STATIC_DIR: Final = HERE / "static"

TEMPLATES = web.AppKey("templates", jinja2.Environment)


def environment(adapter_templates: Path | None) -> jinja2.Environment:
    """The environment of one application (the adapter's templates before ours)."""
    folders = [str(p) for p in (adapter_templates, TEMPLATE_DIR) if p is not None]
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(folders),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env


def render(request: web.Request, name: str, context: Mapping[str, Any], *,
           status: int = 200) -> web.Response:
    """``name`` rendered with ``context`` as an HTML answer."""
    env = request.config_dict[TEMPLATES]
    text = env.get_template(name).render(**context)
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")
