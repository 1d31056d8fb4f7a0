"""``GET /api/openapi.yaml``: the JSON API's description (``docs/openapi.yaml``).

Public: it describes routes, never data or secrets. Found next to the checkout (``docs/``),
else where ``pip install`` puts it (``<prefix>/share/crm-bridge/docs``),
and sent as it is on each request.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Final

from aiohttp import web

NAME: Final = "openapi.yaml"
CANDIDATES: Final = (
    Path(__file__).resolve().parents[1] / "docs" / NAME,
    Path(sys.prefix) / "share" / "crm-bridge" / "docs" / NAME,
)

routes = web.RouteTableDef()


def find() -> Path:
    """Where the description is; ``FileNotFoundError`` naming the places looked at."""
    for path in CANDIDATES:
        if path.is_file():
            return path
    raise FileNotFoundError(f"{NAME} is in none of {', '.join(map(str, CANDIDATES))}")


@routes.get("/api/openapi.yaml")
async def openapi(request: web.Request) -> web.FileResponse:
    """The OpenAPI 3.1 description of the API, as YAML."""
    return web.FileResponse(find(), headers={"Content-Type": "application/yaml",
                                             "Cache-Control": "no-cache"})
