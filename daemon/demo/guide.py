"""What the demo prints: where to look, a status line now and then, and how it stopped.

Printed on the terminal (stdout), never logged: the guide holds the admin links and the
service token, as ``make run``'s banner and ``crm-bridge admin-link`` do. It never holds a
``clientId``: a click goes through the RetailCRM simulator (``POST /_click``), which knows
it as RetailCRM does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from daemon.demo.enterprises import DemoEnterprise
from daemon.demo.traffic import Counters

PRETTY = "python3 -m json.tool"


@dataclass(frozen=True, slots=True)
class Shown:
    """One demo enterprise as the guide shows it."""

    firm: DemoEnterprise
    crm_url: str
    admin_link: str


@dataclass(frozen=True, slots=True)
class Places:
    """Where everything runs."""

    bridge_url: str
    pbx_url: str
    service_token: str
    log_dir: Path
    calls_per_minute: float


def guide(places: Places, shown: Sequence[Shown]) -> str:
    """The text printed once everything is up."""
    url, token = places.bridge_url, places.service_token
    auth = f"-H 'Authorization: Bearer {token}'"
    lines = [
        "",
        "crm-bridge demo is running (development mode: throwaway secrets; never use it in "
        "production).",
        "",
        f"crm-bridge  {url}   (log: {places.log_dir / 'crm-bridge.log'})",
        f"  health    curl {url}/health      ready: curl {url}/ready",
        f"  metrics   curl -s {url}/metrics | grep '^crm_bridge_deliveries'",
        f"  stats     curl -s {auth} {url}/stats | {PRETTY}",
        f"PBX simulator  {places.pbx_url}  (what it was asked: curl -s "
        f"{places.pbx_url}/_requests | {PRETTY})",
        "",
    ]
    for item in shown:
        lines += _enterprise(url, auth, places.pbx_url, item)
    lines += [
        f"Calls: {places.calls_per_minute:g} a minute, alternating between the enterprises "
        "(incoming, missed, outgoing, internal, a hangup stored before its dial, a hangup "
        "recovered later).",
        "Stop: Ctrl-C.",
        "",
    ]
    return "\n".join(lines)


def _enterprise(url: str, auth: str, pbx_url: str, item: Shown) -> list[str]:
    firm, crm = item.firm, item.crm_url
    managers = ", ".join(f"{uid}→{number}" for uid, number in firm.managers.items())
    via = ("the call services' SQL insert" if firm.via == "sql"
           else "POST /api/events (the platform's envelope)")
    first_manager, first_code = next(iter(firm.managers.items()))
    click = (f"curl -s -X POST {crm}/_click -d '{{\"userId\": {first_manager}, "
             f"\"phone\": \"{firm.known_caller}\"}}'")
    phone = quote(firm.known_caller, safe="")
    return [
        f"Enterprise {firm.number} ({firm.name}): Token {firm.name2}, internal numbers "
        f"{', '.join(firm.numbers)}, RetailCRM managers {managers}; events through {via}",
        f"  admin pages      {item.admin_link}",
        f"  RetailCRM (sim)  {crm}   what it received: curl -s '{crm}/_requests?limit=5' "
        f"| {PRETTY}",
        f"  click-to-call    RetailCRM calls {url}/retailcrm/make-call?clientId=<the module's "
        f"secret>&code={first_code}&phone=…&userId={first_manager};",
        f"                   the simulator holds that secret, as RetailCRM does — make it "
        f"click: {click}",
        f"                   then: curl -s {pbx_url}/_requests | {PRETTY}",
        f"  smart redirect   curl -s {auth} "
        f"'{url}/api/smart-redirect?enterprise={firm.number}&phone={phone}'",
        "",
    ]


def status(counters: Counters, received: Sequence[tuple[str, int | None]]) -> str:
    """One line: the calls made so far and what each RetailCRM account received."""
    seen = ", ".join(f"{number}: {'?' if count is None else count}"
                     for number, count in received)
    failed = f", {counters.failed} not stored" if counters.failed else ""
    return (f"demo: {counters.calls} calls, {counters.events} events stored{failed}; "
            f"RetailCRM requests received — {seen}")


def stopped(throwaway_db: bool) -> str:
    """The last words."""
    text = "demo: stopped crm-bridge and the simulators."
    if throwaway_db:
        text += (" The throwaway PostgreSQL (.pgdata) keeps running: make stop stops it, "
                 "make clean deletes it.")
    return text
