"""TLS contexts for DICOM (PS3.15 B.9, BCP 195 non-downgrading profile): TLS 1.2 or newer, verified peers.

``server_context`` wraps the listener's sockets; ``client_context`` is for our C-STORE SCU to a destination
with ``tls = true`` (pynetdicom: ``ae.associate(host, port, tls_args=(client_context(settings), host))``).
"""

from __future__ import annotations

import ssl

from service.core.settings import Settings

# BCP 195 (RFC 9325) forbids TLS 1.0/1.1 and SSL; leave cipher choice to OpenSSL's secure defaults for
# TLS 1.3 and restrict TLS 1.2 to AEAD suites with forward secrecy.
_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"


def _harden(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(_TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION


def server_context(settings: Settings) -> ssl.SSLContext:
    """The listener's context: our certificate, and client certificates checked when configured."""
    if settings.tls_certificate is None or settings.tls_private_key is None:
        raise ValueError("TLS needs tls_certificate and tls_private_key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx)
    ctx.load_cert_chain(settings.tls_certificate, settings.tls_private_key)
    if settings.tls_ca_certificates is not None:
        ctx.load_verify_locations(cafile=settings.tls_ca_certificates)
    # Mutual authentication: without a client certificate signed by our CA the handshake fails.
    ctx.verify_mode = ssl.CERT_REQUIRED if settings.tls_require_client_cert else ssl.CERT_NONE
    return ctx


def client_context(settings: Settings) -> ssl.SSLContext:
    """Context for sending: the destination's certificate verified, ours presented if configured."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx)
    if settings.tls_ca_certificates is not None:
        ctx.load_verify_locations(cafile=settings.tls_ca_certificates)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = settings.tls_check_hostname
    if settings.tls_certificate is not None and settings.tls_private_key is not None:
        ctx.load_cert_chain(settings.tls_certificate, settings.tls_private_key)
    return ctx
