"""TLS for the handshake's STARTTLS: credentials laid out as QEMU's ``tls-creds-x509``.

A directory holds ``ca-cert.pem``, ``server-cert.pem`` and ``server-key.pem``
(what ``qemu-nbd --object tls-creds-x509,dir=DIR`` reads).  Client
certificates are required, and verified against the CA, when
``verify_peer`` is set or an authorisation list is given; the list names
the subjects (distinguished names, ``CN=...,O=...``) that may connect.
Nothing here does I/O on a socket: the server asks for the context and, after
the TLS handshake, whether the peer may stay.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path

CA_CERT, SERVER_CERT, SERVER_KEY = "ca-cert.pem", "server-cert.pem", "server-key.pem"


class TlsSetupError(Exception):
    """The credentials cannot be used; the message names the file and the problem."""


def _rdns(text: str) -> frozenset[tuple[str, str]]:
    """A distinguished name as a set of (attribute, value): ``CN=a, O=b`` and ``O=b,CN=a`` agree."""
    pairs = []
    for part in text.replace(", ", ",").split(","):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"{text!r} is not a distinguished name (CN=...,O=...)")
        pairs.append((key.strip().upper(), value.strip()))
    return frozenset(pairs)


_SHORT = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
          "countryName": "C", "stateOrProvinceName": "ST", "localityName": "L",
          "emailAddress": "EMAILADDRESS", "domainComponent": "DC"}  # fmt: skip


def subject_of(peercert: dict) -> str:
    """The subject of ``ssl.SSLSocket.getpeercert()`` as ``CN=...,O=...``."""
    parts = [f"{_SHORT.get(k, k)}={v}" for rdn in peercert.get("subject", ()) for k, v in rdn]
    return ",".join(parts)


@dataclass
class TlsConfig:
    creds_dir: Path
    verify_peer: bool = False
    authz: list[str] = field(default_factory=list)  # subjects allowed; empty: any (verified) client
    _allowed: list[frozenset] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        try:
            self._allowed = [_rdns(dn) for dn in self.authz]
        except ValueError as e:
            raise TlsSetupError(f"--tls-authz: {e}") from None

    @property
    def wants_client_cert(self) -> bool:
        return self.verify_peer or bool(self.authz)

    def context(self) -> ssl.SSLContext:
        """A server context (TLS 1.2 or newer); TlsSetupError names what is missing or wrong."""
        d = Path(self.creds_dir)
        for name in (CA_CERT, SERVER_CERT, SERVER_KEY):
            if not (d / name).is_file():
                raise TlsSetupError(f"{d / name}: missing (a tls-creds-x509 directory needs {name})")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(d / SERVER_CERT, d / SERVER_KEY)
            ctx.load_verify_locations(d / CA_CERT)
        except (ssl.SSLError, OSError) as e:
            raise TlsSetupError(f"{d}: cannot load the certificates: {e}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED if self.wants_client_cert else ssl.CERT_NONE
        return ctx

    def allows(self, peercert: dict | None) -> tuple[bool, str]:
        """May this (verified) peer stay?  (answer, its subject for the log)."""
        if not self.authz:
            return True, subject_of(peercert) if peercert else "(no certificate)"
        if not peercert:
            return False, "(no certificate)"
        subject = subject_of(peercert)
        try:
            mine = _rdns(subject)
        except ValueError:
            return False, subject
        return mine in self._allowed, subject
