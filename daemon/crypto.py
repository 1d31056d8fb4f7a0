"""Secrets at rest: CRM API keys are stored encrypted with Fernet (AES-128-CBC + HMAC-SHA256).

``cryptography``'s Fernet is authenticated encryption with a versioned token format; a
``MultiFernet`` over ``CRM_BRIDGE_ENCRYPTION_KEYS`` encrypts with the first key and decrypts
with any, which is how keys are rotated: prepend a new key and keep the old one until every
stored key has been saved again. Plaintext exists only in memory (decrypted tokens are
remembered there, so a full configuration reload does not decrypt thousands again).

Also: ``fingerprint`` — a keyed hash used as a dictionary key for callback secrets, so a
``clientId`` lookup compares digests, never the secret itself.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from daemon.errors import ConfigError

MAX_REMEMBERED = 100_000


class Crypto:
    """Encrypts and decrypts stored secrets; built once from the settings."""

    def __init__(self, encryption_keys: tuple[str, ...], secret_key: str) -> None:
        self._fernet = MultiFernet([Fernet(k.encode("ascii")) for k in encryption_keys])
        self._hmac_key = hashlib.sha256(b"crm-bridge fingerprint\0" + secret_key.encode()).digest()
        # token -> plaintext: a full config refresh re-reads thousands of unchanged tokens.
        self._plain: dict[str, str] = {}

    def encrypt(self, plaintext: str) -> str:
        """A token to store instead of ``plaintext``."""
        return self._fernet.encrypt(plaintext.encode("utf-8")).decode("ascii")

    def decrypt(self, token: str, *, field: str = "api_key") -> str:
        """The plaintext of a stored token; ``ConfigError(field)`` when it cannot be read."""
        known = self._plain.get(token)
        if known is not None:
            return known
        try:
            plain = self._fernet.decrypt(token.encode("ascii")).decode("utf-8")
        except (InvalidToken, UnicodeError, ValueError):
            raise ConfigError(
                field, "cannot be decrypted with the configured CRM_BRIDGE_ENCRYPTION_KEYS"
            ) from None
        if len(self._plain) >= MAX_REMEMBERED:
            self._plain.clear()
        self._plain[token] = plain
        return plain

    def fingerprint(self, secret: str) -> str:
        """A stable keyed digest of ``secret`` (safe to keep as a lookup key)."""
        return hmac.new(self._hmac_key, secret.encode("utf-8"), hashlib.sha256).hexdigest()
