"""The API v5 endpoints crm-bridge uses, answered as RetailCRM would.

Every ``/api/`` request passes :meth:`AccountApi.middleware` first, in the order a real
account's request meets things: it is recorded (its form too, JSON fields decoded), meets a
fault if one applies (they stand for the network and the servers in front), then the key
check (``X-API-KEY`` header or ``apiKey`` query; else 403 ``Wrong "apiKey" value.``), the
rate limit (503), and the form encoding (a POST must be
``application/x-www-form-urlencoded``). An unknown route answers RetailCRM's JSON error,
never aiohttp's page. The handlers then read and change the account
(:class:`~.account.Simulator`).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from . import faults
from .state import (
    FORM_CONTENT_TYPE,
    MAX_UPLOAD_BATCH,
    PAGE_LIMITS,
    RATE_LIMIT_MSG,
    USER_STATUSES,
    WRONG_KEY_MSG,
    RecordedRequest,
    key_fingerprint,
    phone_digits,
)
from .validation import (
    BLANK,
    EXTRA,
    FORM,
    JSON_FIELDS,
    ApiError,
    event_errors,
    json_field,
    listed,
    module_errors,
    query_bool,
    query_int,
    try_json,
    upload_errors,
)

if TYPE_CHECKING:
    from .account import Simulator

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_FILTER_RE: Final = re.compile(r"filter\[(\w+)\]")
_MANAGER_FIELDS: Final = ("id", "firstName", "lastName", "patronymic", "email", "phone",
                          "status", "online")


class AccountApi:
    """The API routes of one simulated account (``sim``)."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    def routes(self) -> list[web.RouteDef]:
        """Every API route this account answers."""
        return [
            web.get("/api/credentials", self.credentials, allow_head=False),
            web.get("/api/v5/integration-modules/{code}", self.get_module, allow_head=False),
            web.post("/api/v5/integration-modules/{code}/edit", self.edit_module),
            web.post("/api/v5/telephony/call/event", self.call_event),
            web.post("/api/v5/telephony/calls/upload", self.upload_calls),
            web.get("/api/v5/telephony/manager", self.manager, allow_head=False),
            web.get("/api/v5/users", self.users, allow_head=False),
            web.post(r"/api/v5/users/{id:\d+}/status", self.user_status),
        ]

    # -- what every request meets ----------------------------------------------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Record, fault, key check, rate limit and form decoding for every ``/api/`` request."""
        path = request.path
        if not path.startswith("/api/"):
            return await handler(request)
        record = RecordedRequest(
            time.time(), time.monotonic(), request.method, path,
            {k: v for k, v in request.query.items() if k != "apiKey"},
        )
        self.sim.state.requests.append(record)
        try:
            response = await self._serve(request, handler, record)
        except ApiError as exc:
            response = exc.response()
        except web.HTTPException as exc:  # no such route or method: RetailCRM answers JSON
            response = ApiError(exc.status, exc.reason).response()
        except faults.Dropped:
            record.status = None
            return web.Response(status=499)  # the connection is already gone
        except Exception:
            record.status = 500  # a simulator bug: aiohttp answers 500 with the traceback logged
            raise
        record.status = response.status
        return response

    async def _serve(
        self, request: web.Request, handler: Handler, record: RecordedRequest
    ) -> web.StreamResponse:
        sim = self.sim
        key = request.headers.get("X-API-KEY")
        record.key_source = "header" if key is not None else None
        if key is None:
            key = request.query.get("apiKey")
            record.key_source = "query" if key is not None else None
        record.key_ok = key is not None and key in sim.keys
        record.key_id = None if key is None else key_fingerprint(key)
        if request.method == "POST" and request.content_type == FORM_CONTENT_TYPE:
            # Read (and recorded) first: a request a fault answers still says what it was.
            posted = await request.post()
            form = {k: v for k, v in posted.items() if isinstance(v, str)}
            request[FORM] = form
            record.form = {k: try_json(v) if k in JSON_FIELDS else v for k, v in form.items()}
        # Faults stand for the network and the servers in front: they come before the API.
        if sim.faults:
            fault = faults.pick(sim.faults, record.path, key, sim.rng)
            if fault is not None:
                record.fault = fault.kind()
                answer = await faults.apply(fault, request, lambda: sim.stall_release)
                if answer is not None:
                    return answer
        if key is None or not record.key_ok:
            raise ApiError(403, WRONG_KEY_MSG)
        if sim.rate_limit and not sim.admit(key, record.path):
            raise ApiError(503, RATE_LIMIT_MSG)
        if request.method == "POST" and request.content_type != FORM_CONTENT_TYPE:
            raise ApiError(
                400, f"POST bodies must be {FORM_CONTENT_TYPE}, not "
                f"{request.content_type or 'empty'}",
            )
        return await handler(request)

    # -- the endpoints ---------------------------------------------------------------------

    async def credentials(self, request: web.Request) -> web.Response:
        """``GET /api/credentials``: the key's scopes and sites."""
        return web.json_response({
            "success": True, "scopes": self.sim.scopes, "siteAccess": "access_full",
            "sitesAvailable": self.sim.sites,
        })

    async def get_module(self, request: web.Request) -> web.Response:
        """``GET /api/v5/integration-modules/{code}``."""
        module = self.sim.state.modules.get(request.match_info["code"])
        if module is None:
            raise ApiError(404, "Not found")
        return web.json_response({"success": True, "integrationModule": module})

    async def edit_module(self, request: web.Request) -> web.Response:
        """``POST /api/v5/integration-modules/{code}/edit``: validated, then stored whole."""
        sim = self.sim
        if sim.module_402:
            raise ApiError(402, "Payment required: the account is not paid")
        code = request.match_info["code"]
        module = json_field(request, "integrationModule", dict)
        problems = module_errors(code, module)
        if problems:
            raise ApiError(400, "Integration module is not valid", problems)
        telephony = (module.get("integrations") or {}).get("telephony") or {}
        info: dict[str, Any] = {}
        missing_users = sorted({
            int(c["userId"]) for c in telephony.get("additionalCodes", [])
            if int(c["userId"]) not in sim.users
        })
        if missing_users:
            info["notExistUsersIds"] = missing_users
        missing_sites = sorted({
            p["siteCode"] for p in telephony.get("externalPhones", [])
            if p["siteCode"] not in sim.sites
        })
        if missing_sites:
            info["notExistSiteCodes"] = missing_sites
        sim.state.modules[code] = module
        sim.state.last_module_code = code
        return web.json_response({"success": True, "info": info})

    async def call_event(self, request: web.Request) -> web.Response:
        """``POST /api/v5/telephony/call/event``: a card opens (or closes)."""
        event = json_field(request, "event", dict)
        problems = event_errors(event)
        if problems:
            raise ApiError(400, "Call event is not valid", problems)
        self.sim.state.call_events.append(event)
        body: dict[str, Any] = {"success": True}
        known_codes = self.sim.state.known_codes()
        unknown_codes = [c for c in event.get("codes", []) if c not in known_codes]
        if unknown_codes:
            body["notExistCodes"] = unknown_codes
        unknown_users = [u for u in event.get("userIds", []) if u not in self.sim.users]
        if unknown_users:
            body["notExistUsers"] = unknown_users
        return web.json_response(body)

    async def upload_calls(self, request: web.Request) -> web.Response:
        """``POST /api/v5/telephony/calls/upload``: idempotent by ``externalId``."""
        calls = json_field(request, "calls", list)
        if not calls:
            raise ApiError(400, "Parameter 'calls' is empty", {"calls": BLANK})
        if len(calls) > MAX_UPLOAD_BATCH:
            raise ApiError(
                400, f"At most {MAX_UPLOAD_BATCH} calls per request, got {len(calls)}",
                {"calls": f"This collection should contain {MAX_UPLOAD_BATCH} elements or less."},
            )
        problems: dict[str, str] = {}
        for index, call in enumerate(calls):
            problems.update(upload_errors(index, call))
        if problems:
            raise ApiError(400, "Calls are not valid", problems)
        uploaded = self.sim.state.uploaded_calls
        duplicates: list[Any] = []
        processed = 0
        for call in calls:
            external_id = str(call["externalId"])
            if external_id in uploaded:
                duplicates.append(call["externalId"])
                continue
            uploaded[external_id] = call
            processed += 1
        return web.json_response(
            {"success": True, "processedCallsCount": processed, "duplicateCalls": duplicates}
        )

    async def manager(self, request: web.Request) -> web.Response:
        """``GET /api/v5/telephony/manager``: who is responsible for a phone."""
        sim = self.sim
        query = request.query
        phone = query.get("phone", "")
        if not phone_digits(phone):
            raise ApiError(400, "Parameter 'phone' is missing", {"phone": BLANK})
        details = query_bool(query, "details", False)
        ignore_status = query_bool(query, "ignoreStatus", False)
        digits = phone_digits(phone)
        known = digits in sim.managers or digits in sim.customers
        user = sim.users.get(sim.managers.get(digits, 0))
        if user is None or not user["active"] or (not ignore_status and user["status"] != "free"):
            if sim.manager_404:
                raise ApiError(404, "Manager not found")
            if not (known and details):
                return web.json_response({"success": True, "manager": None})
            user = None
        manager: dict[str, Any] | None = None
        if user is not None:
            manager = {k: user[k] for k in _MANAGER_FIELDS}
            code = sim.state.code_of(user["id"])
            if code is not None:
                manager["code"] = code
        body: dict[str, Any] = {"success": True, "manager": manager}
        if details:
            customer_id = int(digits[-6:])
            body["customer"] = {
                "type": "customer", "id": customer_id, "phones": [{"number": phone}],
                **sim.customers.get(digits, {}),
            }
            body["links"] = {
                "newOrderLink": "/orders/add", "lastOrderLink": None,
                "newCustomerLink": "/customers/add", "customerLink": f"/customers/{customer_id}",
            }
        return web.json_response(body)

    async def users(self, request: web.Request) -> web.Response:
        """``GET /api/v5/users``: filtered, paginated as RetailCRM does (20/50/100)."""
        query = request.query
        limit = query_int(query, "limit", 20)
        if limit not in PAGE_LIMITS:
            raise ApiError(400, "Errors in the input parameters",
                           {"limit": f"The value must be one of {list(PAGE_LIMITS)}."})
        page = query_int(query, "page", 1)
        if page < 1:
            raise ApiError(400, "Errors in the input parameters",
                           {"page": "This value should be 1 or more."})
        users = list(self.sim.users.values())
        for key in query:
            match = _FILTER_RE.fullmatch(key)
            if match is None:
                continue
            name = match.group(1)
            if name not in ("active", "isManager", "online"):
                raise ApiError(400, "Errors in the input parameters", {key: EXTRA})
            wanted = query_bool(query, key, True)
            users = [u for u in users if u[name] == wanted]
        total = len(users)
        return web.json_response({
            "success": True,
            "pagination": {
                "limit": limit, "totalCount": total, "currentPage": page,
                "totalPageCount": math.ceil(total / limit),
            },
            "users": users[(page - 1) * limit:page * limit],
        })

    async def user_status(self, request: web.Request) -> web.Response:
        """``POST /api/v5/users/{id}/status``."""
        user = self.sim.users.get(int(request.match_info["id"]))
        if user is None:
            raise ApiError(404, "Not found")
        status = request[FORM].get("status")
        if status not in USER_STATUSES:
            raise ApiError(400, "Errors in the input parameters",
                           {"status": f"The value must be one of: {listed(USER_STATUSES)}."})
        user["status"] = status
        self.sim.state.statuses.append(
            {"userId": user["id"], "status": status, "time": time.time()})
        return web.json_response({"success": True})
