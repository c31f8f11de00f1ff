"""Delivery providers behind one interface: Twilio SMS, WhatsApp Cloud API, SMTP email, and sandbox.

ProviderError
 ├── retryable=True   5xx, 429, timeouts, connection errors, SMTP 4xx: try again later
 └── retryable=False  other 4xx, SMTP 5xx, provider not configured: try the next channel

Each provider has its own credentials from the environment (ProviderConfig.from_env). Errors
carry the provider's status and error code, never the recipient's number or address.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Protocol

import aiosmtplib
import httpx

from services.notifications.templates import WHATSAPP_LANGUAGES
from shared.pii import mask_email, mask_phone, redact


@dataclass(frozen=True)
class OutgoingMessage:
    """One message to one address; `to` is personal data and never logged."""

    notification_id: str
    channel: str
    kind: str
    locale: str
    to: str = field(repr=False)
    subject: str
    body: str
    params: Mapping[str, str] = field(default_factory=dict)

    @property
    def masked_to(self) -> str:
        return mask_email(self.to) if self.channel == "email" else mask_phone(self.to)


@dataclass(frozen=True)
class SendResult:
    """The provider accepted the message."""

    provider: str
    provider_message_id: str | None


class ProviderError(Exception):
    """The provider did not accept the message; `reason` is safe to record and publish."""

    def __init__(self, provider: str, reason: str, *, retryable: bool, status: int | None = None) -> None:
        super().__init__(f"{provider}: {reason}")
        self.provider = provider
        self.reason = reason
        self.retryable = retryable
        self.status = status


class Provider(Protocol):
    """Sends one message on one channel."""

    name: str
    channel: str

    async def send(self, message: OutgoingMessage) -> SendResult: ...


@dataclass(frozen=True)
class ProviderConfig:
    """Provider endpoints and credentials, read once from the environment."""

    twilio_url: str = "https://api.twilio.com"
    twilio_account_sid: str | None = None
    twilio_auth_token: str | None = field(default=None, repr=False)
    twilio_from: str | None = None
    twilio_messaging_service_sid: str | None = None
    whatsapp_url: str = "https://graph.facebook.com"
    whatsapp_api_version: str = "21.0"
    whatsapp_phone_number_id: str | None = None
    whatsapp_token: str | None = field(default=None, repr=False)
    whatsapp_app_secret: str | None = field(default=None, repr=False)
    whatsapp_verify_token: str | None = field(default=None, repr=False)
    whatsapp_template_prefix: str = "omnicrm_"
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 25
    smtp_user: str | None = None
    smtp_password: str | None = field(default=None, repr=False)
    smtp_from: str = "omnicrm <no-reply@omnicrm.local>"
    smtp_starttls: bool = False
    smtp_tls: bool = False
    email_webhook_secret: str | None = field(default=None, repr=False)
    public_url: str | None = None  # where providers reach our status callbacks
    timeout_seconds: float = 10.0

    @property
    def message_id_domain(self) -> str:
        return self.smtp_from.rpartition("@")[2].rstrip(">").strip() or "omnicrm.local"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ProviderConfig:
        e = os.environ if env is None else env
        d = cls()

        def flag(name: str) -> bool:
            return e.get(name, "").strip().lower() in ("1", "true", "yes")

        return cls(
            twilio_url=(e.get("OMNICRM_TWILIO_URL") or d.twilio_url).rstrip("/"),
            twilio_account_sid=e.get("OMNICRM_TWILIO_ACCOUNT_SID") or None,
            twilio_auth_token=e.get("OMNICRM_TWILIO_AUTH_TOKEN") or None,
            twilio_from=e.get("OMNICRM_TWILIO_FROM") or None,
            twilio_messaging_service_sid=e.get("OMNICRM_TWILIO_MESSAGING_SERVICE_SID") or None,
            whatsapp_url=(e.get("OMNICRM_WHATSAPP_URL") or d.whatsapp_url).rstrip("/"),
            whatsapp_api_version=(e.get("OMNICRM_WHATSAPP_API_VERSION") or d.whatsapp_api_version).lstrip("v"),
            whatsapp_phone_number_id=e.get("OMNICRM_WHATSAPP_PHONE_NUMBER_ID") or None,
            whatsapp_token=e.get("OMNICRM_WHATSAPP_TOKEN") or None,
            whatsapp_app_secret=e.get("OMNICRM_WHATSAPP_APP_SECRET") or None,
            whatsapp_verify_token=e.get("OMNICRM_WHATSAPP_VERIFY_TOKEN") or None,
            whatsapp_template_prefix=e.get("OMNICRM_WHATSAPP_TEMPLATE_PREFIX", d.whatsapp_template_prefix),
            smtp_host=e.get("OMNICRM_SMTP_HOST") or d.smtp_host,
            smtp_port=int(e.get("OMNICRM_SMTP_PORT") or d.smtp_port),
            smtp_user=e.get("OMNICRM_SMTP_USER") or None,
            smtp_password=e.get("OMNICRM_SMTP_PASSWORD") or None,
            smtp_from=e.get("OMNICRM_SMTP_FROM") or d.smtp_from,
            smtp_starttls=flag("OMNICRM_SMTP_STARTTLS"),
            smtp_tls=flag("OMNICRM_SMTP_TLS"),
            email_webhook_secret=e.get("OMNICRM_EMAIL_WEBHOOK_SECRET") or None,
            public_url=(e.get("OMNICRM_PUBLIC_URL") or "").rstrip("/") or None,
            timeout_seconds=float(e.get("OMNICRM_PROVIDER_TIMEOUT_SECONDS") or d.timeout_seconds),
        )


def _http_error(provider: str, response: httpx.Response, code: object) -> ProviderError:
    status = response.status_code
    reason = f"http_{status}" + (f" code {code}" if code not in (None, "") else "")
    return ProviderError(provider, reason, retryable=status >= 500 or status in (408, 429),
                         status=status)


def _json(response: httpx.Response) -> dict:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


async def _post(provider: str, client: httpx.AsyncClient, url: str, **kwargs) -> httpx.Response:
    try:
        return await client.post(url, **kwargs)
    except httpx.TimeoutException as exc:
        raise ProviderError(provider, "timeout", retryable=True) from exc
    except httpx.TransportError as exc:
        raise ProviderError(provider, f"connection_error {type(exc).__name__}", retryable=True) from exc


class TwilioSms:
    """SMS through the Twilio Messages API (form-encoded POST, HTTP basic auth)."""

    name = "twilio"
    channel = "sms"

    def __init__(self, config: ProviderConfig, client: httpx.AsyncClient) -> None:
        self.config = config
        self.client = client

    async def send(self, message: OutgoingMessage) -> SendResult:
        c = self.config
        if not (c.twilio_account_sid and c.twilio_auth_token and (c.twilio_from or c.twilio_messaging_service_sid)):
            raise ProviderError(self.name, "not_configured", retryable=False)
        data = {"To": message.to, "Body": message.body}
        if c.twilio_messaging_service_sid:
            data["MessagingServiceSid"] = c.twilio_messaging_service_sid
        else:
            data["From"] = c.twilio_from or ""
        if c.public_url:
            data["StatusCallback"] = (f"{c.public_url}/v1/providers/twilio/status"
                                      f"?notification_id={message.notification_id}")
        url = f"{c.twilio_url}/2010-04-01/Accounts/{c.twilio_account_sid}/Messages.json"
        response = await _post(self.name, self.client, url, data=data,
                               auth=(c.twilio_account_sid, c.twilio_auth_token),
                               headers={"X-Omnicrm-Notification-Id": message.notification_id},
                               timeout=c.timeout_seconds)
        body = _json(response)
        if response.status_code >= 300:
            raise _http_error(self.name, response, body.get("code"))
        return SendResult(self.name, body.get("sid"))


class WhatsAppCloud:
    """WhatsApp through the Cloud API: approved template messages, bearer token."""

    name = "whatsapp_cloud"
    channel = "whatsapp"

    def __init__(self, config: ProviderConfig, client: httpx.AsyncClient) -> None:
        self.config = config
        self.client = client

    def payload(self, message: OutgoingMessage) -> dict:
        """The documented `messages` request for a template message."""
        parameters = [{"type": "text", "parameter_name": name, "text": value or "-"}
                      for name, value in message.params.items()]
        template: dict = {
            "name": f"{self.config.whatsapp_template_prefix}{message.kind}",
            "language": {"code": WHATSAPP_LANGUAGES.get(message.locale, "en")},
        }
        if parameters:
            template["components"] = [{"type": "body", "parameters": parameters}]
        return {
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": message.to.lstrip("+"),
            "type": "template",
            "template": template,
            # Echoed back in status webhooks: ties a callback to our notification.
            "biz_opaque_callback_data": message.notification_id,
        }

    async def send(self, message: OutgoingMessage) -> SendResult:
        c = self.config
        if not (c.whatsapp_phone_number_id and c.whatsapp_token):
            raise ProviderError(self.name, "not_configured", retryable=False)
        url = f"{c.whatsapp_url}/v{c.whatsapp_api_version}/{c.whatsapp_phone_number_id}/messages"
        response = await _post(self.name, self.client, url, json=self.payload(message),
                               headers={"Authorization": f"Bearer {c.whatsapp_token}",
                                        "X-Omnicrm-Notification-Id": message.notification_id},
                               timeout=c.timeout_seconds)
        body = _json(response)
        if response.status_code >= 300:
            error = body.get("error") if isinstance(body.get("error"), dict) else {}
            raise _http_error(self.name, response, error.get("code"))
        messages = body.get("messages") or [{}]
        return SendResult(self.name, messages[0].get("id"))


class SmtpEmail:
    """Email over SMTP with aiosmtplib; the Message-ID is derived from the notification id."""

    name = "smtp"
    channel = "email"

    def __init__(self, config: ProviderConfig) -> None:
        self.config = config

    def build(self, message: OutgoingMessage) -> EmailMessage:
        email = EmailMessage()
        email["From"] = self.config.smtp_from
        email["To"] = message.to
        email["Subject"] = message.subject or message.body.split("\n", 1)[0][:120]
        # A resend after a crash carries the same Message-ID, so mail systems can de-duplicate.
        email["Message-ID"] = f"<{message.notification_id}@{self.config.message_id_domain}>"
        email["X-Omnicrm-Notification-Id"] = message.notification_id
        email["Content-Language"] = message.locale
        email.set_content(message.body)
        return email

    async def send(self, message: OutgoingMessage) -> SendResult:
        c = self.config
        email = self.build(message)
        try:
            await aiosmtplib.send(
                email, hostname=c.smtp_host, port=c.smtp_port, username=c.smtp_user,
                password=c.smtp_password, start_tls=c.smtp_starttls or None, use_tls=c.smtp_tls,
                timeout=c.timeout_seconds)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = sorted({r.code for r in exc.recipients})
            raise ProviderError(self.name, f"smtp_{codes[0] if codes else 550} recipient refused",
                                retryable=bool(codes) and all(400 <= k < 500 for k in codes)) from exc
        except aiosmtplib.SMTPResponseException as exc:
            raise ProviderError(self.name, f"smtp_{exc.code} {redact(exc.message)[:80]}",
                                retryable=400 <= exc.code < 500, status=exc.code) from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise ProviderError(self.name, f"connection_error {type(exc).__name__}", retryable=True) from exc
        return SendResult(self.name, email["Message-ID"])


class SandboxProvider:
    """OMNICRM_DELIVERY=sandbox: the rendered message is recorded as sent and goes nowhere."""

    name = "sandbox"

    def __init__(self, channel: str) -> None:
        self.channel = channel

    async def send(self, message: OutgoingMessage) -> SendResult:
        return SendResult(self.name, f"sandbox-{message.notification_id}")


def build_providers(delivery: str, config: ProviderConfig,
                    client: httpx.AsyncClient | None) -> dict[str, Provider]:
    """Channel -> provider for the delivery mode (`live` or `sandbox`)."""
    if delivery == "sandbox" or client is None:
        return {ch: SandboxProvider(ch) for ch in ("whatsapp", "sms", "email")}
    return {"sms": TwilioSms(config, client), "whatsapp": WhatsAppCloud(config, client),
            "email": SmtpEmail(config)}
