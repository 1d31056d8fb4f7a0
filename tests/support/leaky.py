"""A careless adapter for the tests (``--integration tests.support.leaky``): the fake CRM's,
except that each delivery logs what it "heard" with the enterprise's API key in a text, a
value and an object key, then fails with a bug whose message quotes the key. Nothing of the
key may reach a log line: the dispatcher declares the enterprise's secrets for the attempt
(``logconfig.hide``) and the redaction processor masks them by value."""

from __future__ import annotations

import structlog

from daemon.integrations.base import AdapterDeps, DeliveryContext, Outcome
from tests.support.fakecrm import FakeConfig, FakeCrmAdapter

NAME = "fakecrm"
log = structlog.get_logger(__name__)


class LeakyAdapter(FakeCrmAdapter):
    async def deliver(self, ctx: DeliveryContext) -> Outcome:
        config = ctx.config
        assert isinstance(config, FakeConfig)
        key = config.api_key
        log.warning("crm_echoed", answer={key: "the key, as a key", "text": f"said {key}"},
                    note=f"X-API-KEY was {key}")
        raise RuntimeError(f"a bug quoting {key}")


def create_adapter(deps: AdapterDeps) -> LeakyAdapter:
    return LeakyAdapter(deps)
