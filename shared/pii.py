"""Masking of contact data: what read APIs show without `read_pii`, and what logs may never hold."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

# An email anywhere in free text; deliberately loose (a false positive only masks more).
_EMAIL = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)+")
# A phone number: optional +, then 7+ digits possibly separated by spaces, dots, dashes or parens.
_PHONE = re.compile(r"(?<![\w.])\+?\(?\d(?:[\s\-.()]{0,2}\d){6,17}(?![\w])")
# Timestamps and dates look like digit runs; keep them readable in logs.
_DATE_LIKE = re.compile(r"^\d{4}-\d{2}-\d{2}")
# A decimal number (a metric value, a duration) is not a phone number, however many digits it has.
_DECIMAL = re.compile(r"\d+\.\d+")
# A UUID (a consumer's member id, an event id) has digit runs shaped like a phone number: not one.
_UUID = re.compile(r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b")


def mask_email(email: str) -> str:
    """`alice@example.com` -> `a***@example.com`."""
    local, _, domain = email.partition("@")
    if not domain:
        return "***"
    return f"{local[:1]}***@{domain}"


def mask_phone(phone: str) -> str:
    """`+8613812345678` -> `+86138****5678`: keeps the first three and last four digits."""
    digits = re.sub(r"\D", "", phone)
    plus = "+" if phone.strip().startswith("+") else ""
    if len(digits) <= 7:
        return plus + "*" * len(digits)
    if plus and len(digits) > 11:
        # keep country code visible and mask the national middle like `138****5678`
        cc_len = len(digits) - 11
        cc, national = digits[:cc_len], digits[cc_len:]
        return f"+{cc}{national[:3]}****{national[-4:]}"
    return f"{plus}{digits[:3]}****{digits[-4:]}"


def mask_identifier(kind: str, value: str) -> str:
    """Mask contact identifiers; ids that are not contact points are shown as they are."""
    if kind == "email":
        return mask_email(value)
    if kind in ("phone", "whatsapp_id"):
        return mask_phone(value)
    return value


def _phone_sub(match: re.Match[str]) -> str:
    text = match.group(0)
    if _DATE_LIKE.match(text) or _DECIMAL.fullmatch(text):
        return text
    digits = re.sub(r"\D", "", text)
    if len(digits) < 7:
        return text
    return mask_phone(text)


def redact(text: str) -> str:
    """Replace anything shaped like an email or phone number in free text."""
    if not text:
        return text
    text = _EMAIL.sub(lambda m: mask_email(m.group(0)), text)
    return _outside_uuids(text, lambda part: _PHONE.sub(_phone_sub, part))


def _outside_uuids(text: str, apply: Callable[[str], str]) -> str:
    """`apply` to the text between UUIDs; the UUIDs stay as they are."""
    out, last = [], 0
    for m in _UUID.finditer(text):
        out += [apply(text[last:m.start()]), m.group(0)]
        last = m.end()
    out.append(apply(text[last:]))
    return "".join(out)


def contains_pii(text: str) -> list[str]:
    """Emails and phone-shaped runs (10+ digits, or + and 8+) left in clear in `text`."""
    found = [m.group(0) for m in _EMAIL.finditer(text) if "***@" not in m.group(0)]
    for m in _PHONE.finditer(_UUID.sub("<uuid>", text)):
        s = m.group(0)
        digits = re.sub(r"\D", "", s)
        if "*" in s or _DATE_LIKE.match(s) or _DECIMAL.fullmatch(s):
            continue
        if (s.startswith("+") and len(digits) >= 8) or len(digits) >= 10:
            found.append(s)
    return found


class PiiRedactingFilter(logging.Filter):
    """Rewrites every record's message and string args so no handler ever sees contact data."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string is logged as is
            return True
        record.msg = redact(message)
        record.args = ()
        return True
