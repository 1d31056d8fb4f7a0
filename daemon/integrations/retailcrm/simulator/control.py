"""The control endpoints: how a test, a benchmark or a person steers the simulated account.

They take no API key and are never recorded. Each answers JSON; a body of the wrong shape
gets 400 ``{"error": "..."}`` saying what is expected, and changes nothing.

* ``GET /_requests[?path=P][&limit=N]``: the API requests received (under ``P``; the
  last ``N``), with ``count``, how many matched;
* ``POST /_reset``: forget what was received, clear the faults (``{"users": true}``,
  ``"keys"``, ``"config"`` also restore those as the simulator was built);
* ``POST /_fault`` / ``DELETE /_fault``: add a fault (:class:`~.faults.Fault`'s fields) /
  clear every fault;
* ``POST /_users``, ``/_managers``, ``/_customers``, ``/_keys``: replace the users, the
  phone → responsible user map, the phone → customer name map, the valid API keys;
* ``POST /_config``: flip ``rate_limit``, ``module_402``, ``manager_404``;
* ``GET /_state``: what was received, the configuration, the faults;
* ``POST /_click``: a manager clicks a number; the module's ``makeCallUrl`` is called
  (:mod:`.callbacks`).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

from . import callbacks
from .faults import Fault

if TYPE_CHECKING:
    from .account import Simulator


class Controls:
    """The control routes of one simulated account (``sim``)."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    def routes(self) -> list[web.RouteDef]:
        """Every control route."""
        return [
            web.get("/_requests", self.requests, allow_head=False),
            web.post("/_reset", self.reset),
            web.post("/_fault", self.fault),
            web.delete("/_fault", self.clear_faults),
            web.post("/_users", self.users),
            web.post("/_managers", self.managers),
            web.post("/_customers", self.customers),
            web.post("/_keys", self.keys),
            web.post("/_config", self.config),
            web.get("/_state", self.state, allow_head=False),
            web.post("/_click", self.click),
        ]

    async def requests(self, request: web.Request) -> web.Response:
        """``GET /_requests``: the request log, filtered by path prefix, the last ``limit``."""
        records = self.sim.recorded(request.query.get("path"))
        raw_limit = request.query.get("limit")
        shown = records
        if raw_limit is not None:
            if not raw_limit.isdigit():
                raise bad_control("limit must be a non-negative integer")
            shown = records[len(records) - int(raw_limit):] if int(raw_limit) else []
        return web.json_response(
            {"count": len(records), "requests": [r.to_json() for r in shown]}
        )

    async def reset(self, request: web.Request) -> web.Response:
        """``POST /_reset``."""
        options = await control_json(request, dict, default={})
        self.sim.reset(users=bool(options.get("users")), keys=bool(options.get("keys")),
                       config=bool(options.get("config")))
        return web.json_response({"success": True})

    async def fault(self, request: web.Request) -> web.Response:
        """``POST /_fault``."""
        data = await control_json(request, dict)
        try:
            fault = self.sim.add_fault(Fault.from_json(data))
        except (TypeError, ValueError) as exc:
            raise bad_control(str(exc)) from None
        return web.json_response({"success": True, "fault": fault.to_json()})

    async def clear_faults(self, request: web.Request) -> web.Response:
        """``DELETE /_fault``."""
        self.sim.clear_faults()
        return web.json_response({"success": True})

    async def users(self, request: web.Request) -> web.Response:
        """``POST /_users``."""
        data = await control_json(request, (list, dict))
        users = data.get("users") if isinstance(data, dict) else data
        if not isinstance(users, list):
            raise bad_control("send a list of users, or {\"users\": [...]}")
        try:
            self.sim.set_users(users)
        except (TypeError, ValueError, AttributeError) as exc:
            raise bad_control(str(exc)) from None
        return web.json_response({"success": True, "count": len(self.sim.users)})

    async def managers(self, request: web.Request) -> web.Response:
        """``POST /_managers``."""
        data = await control_json(request, dict)
        try:
            self.sim.set_managers(data)
        except (TypeError, ValueError) as exc:
            raise bad_control(str(exc)) from None
        return web.json_response({"success": True, "count": len(self.sim.managers)})

    async def customers(self, request: web.Request) -> web.Response:
        """``POST /_customers``."""
        data = await control_json(request, dict)
        if not all(isinstance(v, dict) for v in data.values()):
            raise bad_control("expected {phone: {firstName, lastName, nickName}}")
        self.sim.set_customers(data)
        return web.json_response({"success": True, "count": len(self.sim.customers)})

    async def keys(self, request: web.Request) -> web.Response:
        """``POST /_keys``."""
        data = await control_json(request, (list, dict))
        keys = data.get("keys") if isinstance(data, dict) else data
        if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
            raise bad_control("keys must be a list of non-empty strings")
        self.sim.set_keys(keys)
        return web.json_response({"success": True, "count": len(self.sim.keys)})

    async def config(self, request: web.Request) -> web.Response:
        """``POST /_config``."""
        data = await control_json(request, dict)
        unknown = set(data) - {"rate_limit", "module_402", "manager_404"}
        if unknown or not all(isinstance(v, bool) for v in data.values()):
            raise bad_control("switches: rate_limit, module_402, manager_404 (booleans)")
        self.sim.configure(**data)
        return web.json_response({"success": True, "config": self.sim.config()})

    async def state(self, request: web.Request) -> web.Response:
        """``GET /_state``."""
        return web.json_response(self.sim.snapshot())

    async def click(self, request: web.Request) -> web.Response:
        """``POST /_click``: ``{"userId": 1, "phone": "+375291112233"}`` (``code``,
        ``externalPhone`` optional, ``method`` GET or POST); answers what the module's
        ``makeCallUrl`` answered."""
        data = await control_json(request, dict)
        try:
            click = callbacks.Click.from_json(data)
        except ValueError as exc:
            raise bad_control(str(exc)) from None
        try:
            answer = await callbacks.make_call(self.sim.callback_http(), self.sim.state,
                                              self.sim.users, click)
        except callbacks.CallbackError as exc:
            return web.json_response({"success": False, "error": str(exc)}, status=409)
        return web.json_response({"success": True, **answer})


async def control_json(
    request: web.Request, kind: type[Any] | tuple[type[Any], ...], *, default: Any = None
) -> Any:
    """A control endpoint's JSON body of the expected shape, or a 400 saying what is wrong."""
    raw = await request.text()
    if not raw.strip() and default is not None:
        return default
    try:
        data = json.loads(raw)
    except ValueError:
        raise bad_control("the body must be JSON") from None
    if not isinstance(data, kind):
        raise bad_control("unexpected JSON shape for this control endpoint")
    return data


def bad_control(message: str) -> web.HTTPBadRequest:
    """The 400 a control endpoint answers to a body it cannot use."""
    return web.HTTPBadRequest(
        text=json.dumps({"error": message}), content_type="application/json"
    )
