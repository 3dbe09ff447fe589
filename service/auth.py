"""API keys: who may call what, as `Authorization: Bearer <key>`.

Keys are 256-bit random tokens (`python -m service.keys create`); the keys file holds only their
SHA-256 digests, one `<key_id> <scope,...> sha256:<hex>` line each. A fast unsalted digest is
enough here: salting and slow hashes protect guessable passwords, and a 256-bit random key is not
guessable, so the file reveals nothing usable (it may even be world-readable). The file is read at
start-up and again whenever it changes, so a key is revoked by deleting its line.

Scopes: `infer` (the image endpoints and STOW-RS), `models:read` (/models), `metrics` (/metrics).
The probes (/healthz, /readyz), the page and the API documents need no key: the page must load
before it can ask for one.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from shared import errors as domain

log = logging.getLogger(__name__)

SCOPE_INFER = "infer"
SCOPE_MODELS = "models:read"
SCOPE_METRICS = "metrics"
SCOPES = (SCOPE_INFER, SCOPE_MODELS, SCOPE_METRICS)
KEY_PREFIX = "busi_"
KEY_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_REALM = 'Bearer realm="busi"'
RECHECK_S = 2.0  # how often the keys file's modification time is looked at


class AccessConfigError(ValueError):
    """API_KEYS_FILE is missing, unreadable or malformed, or open access is not allowed here."""


class NotAuthenticatedError(domain.BusiError):
    """No API key, or one that is not in the keys file."""

    code = "unauthorized"

    def __init__(self, message: str, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.headers = headers


class InsufficientScopeError(domain.BusiError):
    """A valid API key without the scope the endpoint needs."""

    code = "forbidden"

    def __init__(self, message: str, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.headers = headers


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    scopes: frozenset[str]
    digest: bytes  # sha256 of the key


def digest_of(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def keys_file_line(key_id: str, scopes: list[str] | tuple[str, ...], key: str) -> str:
    """The keys-file line of `key` (which itself is written nowhere)."""
    return f"{key_id} {','.join(scopes)} sha256:{digest_of(key).hex()}"


def parse_keys(text: str) -> list[ApiKey]:
    """The keys of a keys file. Raises AccessConfigError naming the line (never its content)."""
    keys: list[ApiKey] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 3:
            raise AccessConfigError(
                f"line {number}: expected `<key_id> <scope,...> sha256:<hex>`, "
                f"got {len(fields)} fields"
            )
        key_id, scopes_field, digest_field = fields
        if not KEY_ID_PATTERN.fullmatch(key_id):
            raise AccessConfigError(f"line {number}: a key id is 1-64 of A-Z a-z 0-9 . _ -")
        if key_id in seen:
            raise AccessConfigError(f"line {number}: key id {key_id} appears twice")
        scopes = frozenset(scopes_field.split(","))
        if not scopes <= set(SCOPES):
            raise AccessConfigError(
                f"line {number}: unknown scope; the scopes are {', '.join(SCOPES)}"
            )
        match = _DIGEST.fullmatch(digest_field)
        if not match:
            raise AccessConfigError(f"line {number}: the digest is not sha256:<64 hex digits>")
        seen.add(key_id)
        keys.append(ApiKey(key_id, scopes, bytes.fromhex(match[1])))
    return keys


class KeyRing:
    """The keys of API_KEYS_FILE, re-read when the file changes (a bad edit keeps the old keys)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._checked = 0.0
        self._stamp = self._stat()
        self._keys = self._read()

    def _stat(self) -> tuple[int, int, int]:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise AccessConfigError(
                f"API_KEYS_FILE {self.path} cannot be read ({exc.strerror}); create keys with "
                "`python -m service.keys create --scopes infer --file <path>`"
            ) from None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _read(self) -> list[ApiKey]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise AccessConfigError(f"API_KEYS_FILE {self.path} cannot be read: {exc}") from None
        try:
            keys = parse_keys(text)
        except AccessConfigError as exc:
            raise AccessConfigError(f"API_KEYS_FILE {self.path}, {exc}") from None
        if not keys:
            raise AccessConfigError(f"API_KEYS_FILE {self.path} holds no key")
        return keys

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < RECHECK_S:
            return
        with self._lock:
            self._checked = now
            try:
                stamp = self._stat()
                if stamp != self._stamp:
                    self._keys = self._read()
                    self._stamp = stamp
                    log.info("API keys re-read", extra={"keys": len(self._keys)})
            except AccessConfigError as exc:
                log.error("API keys file not re-read, the previous keys stay: %s", exc)

    def authenticate(self, key: str) -> ApiKey | None:
        """The key's entry, or None. Every entry is compared, in constant time each."""
        self._refresh()
        digest = digest_of(key)
        found = None
        for entry in self._keys:
            if hmac.compare_digest(entry.digest, digest):
                found = entry
        return found

    def __len__(self) -> int:
        return len(self._keys)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_keyring(api_keys_file: Path | None) -> KeyRing | None:
    """The key ring of API_KEYS_FILE, or None when it is unset (open access)."""
    return KeyRing(api_keys_file) if api_keys_file is not None else None


def check_open_access(host: str, keyring: KeyRing | None, allow_open: bool) -> None:
    """Refuse to serve without keys on a non-loopback interface unless explicitly allowed.

    Raises AccessConfigError; logs a warning whenever the service does run open.
    """
    if keyring is not None:
        log.info("authentication on", extra={"keys": len(keyring)})
        return
    if not is_loopback(host) and not allow_open:
        raise AccessConfigError(
            f"refusing to serve without API keys on {host}: set API_KEYS_FILE (see "
            "`python -m service.keys create`), or ALLOW_OPEN_ACCESS=true when a gateway in "
            "front authenticates every request"
        )
    log.warning(
        "authentication is OFF: every endpoint is open to anyone who can reach %s "
        "(set API_KEYS_FILE to require API keys)",
        host,
    )


bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    bearerFormat="opaque API key",
    description="`Authorization: Bearer <key>`, a key made with `python -m service.keys create`. "
    "Scopes: `infer` (/classify, /segment, /diagnose, /dicomweb), `models:read` (/models), "
    "`metrics` (/metrics). Required when the service runs with API_KEYS_FILE.",
)


def require_scope(scope: str) -> Any:
    """A dependency that lets the request through only with a key that holds `scope`."""
    assert scope in SCOPES, scope

    async def check(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        state = request.scope.setdefault("state", {})
        state["scope"] = scope
        keyring: KeyRing | None = request.app.state.keyring
        if keyring is None:
            return
        if sum(name == b"authorization" for name, _ in request.scope["headers"]) > 1:
            # Which one would count is up to each proxy and parser on the way: none does.
            raise NotAuthenticatedError(
                "send one Authorization header, not several",
                {"WWW-Authenticate": f'{_REALM}, error="invalid_request"'},
            )
        if credentials is None or not credentials.credentials:
            raise NotAuthenticatedError(
                "send an API key: Authorization: Bearer <key>", {"WWW-Authenticate": _REALM}
            )
        key = keyring.authenticate(credentials.credentials)
        if key is None:
            raise NotAuthenticatedError(
                "the API key is not valid",
                {"WWW-Authenticate": f'{_REALM}, error="invalid_token"'},
            )
        state["key_id"] = key.key_id
        state.setdefault("log", {})["key_id"] = key.key_id
        if scope not in key.scopes:
            raise InsufficientScopeError(
                f"this API key lacks the `{scope}` scope",
                {"WWW-Authenticate": f'{_REALM}, error="insufficient_scope", scope="{scope}"'},
            )

    check.__name__ = f"require_{scope.replace(':', '_')}"
    return Depends(check)
