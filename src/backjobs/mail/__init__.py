"""Email: templates and rendering (:mod:`.render`), the transport interface and its errors
with the pickup folder (:mod:`.transport`), and SMTP (:mod:`.smtp`).

:func:`make_transport` builds the configured transport; it lives here, above both
transports, so neither transport module imports the other.
"""

from __future__ import annotations

from backjobs.mail.smtp import SmtpTransport
from backjobs.mail.transport import PickupTransport, Transport
from backjobs.settings import EmailTransportKind, Settings

__all__ = ["make_transport"]


def make_transport(settings: Settings) -> Transport:
    """The configured transport (``BACKJOBS_EMAIL_TRANSPORT``)."""
    if settings.email_transport is EmailTransportKind.SMTP:
        return SmtpTransport(
            host=settings.smtp_host,
            port=settings.smtp_port,
            security=settings.smtp_security,
            username=settings.smtp_username,
            password=settings.smtp_password,
            timeout=settings.smtp_timeout_seconds,
            sender=settings.email_from,
            max_connections=settings.email_connections,
            ca_file=settings.smtp_ca_file,
            tls_server_name=settings.smtp_tls_server_name,
        )
    return PickupTransport(directory=settings.email_pickup_dir)
