"""Money in integer minor units: decimal strings in, base-currency minor units out, never floats."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation

# ISO 4217 minor-unit exponents that are not 2.
_EXPONENTS = {"JPY": 0, "KRW": 0, "VND": 0, "CLP": 0, "ISK": 0, "UGX": 0, "XAF": 0, "XOF": 0,
              "BHD": 3, "JOD": 3, "KWD": 3, "OMR": 3, "TND": 3}


def exponent(currency: str) -> int:
    """Digits after the decimal point for `currency`."""
    return _EXPONENTS.get(currency.upper(), 2)


def to_minor(amount: str | int | Decimal, currency: str) -> int:
    """A decimal amount (string or int, never float) in minor units of `currency`."""
    if isinstance(amount, float):
        raise ValueError("money must not be a float")
    try:
        value = Decimal(str(amount))
    except InvalidOperation as exc:
        raise ValueError(f"{amount!r} is not a decimal amount") from exc
    if not value.is_finite():
        raise ValueError("money must be finite")
    return int((value.scaleb(exponent(currency))).to_integral_value(ROUND_HALF_EVEN))


def to_decimal_string(minor: int, currency: str) -> str:
    """Minor units back to a decimal string ("129.90")."""
    exp = exponent(currency)
    return str(Decimal(minor).scaleb(-exp).quantize(Decimal(1).scaleb(-exp)))


@dataclass(frozen=True)
class Money:
    """Converts amounts in any known currency to minor units of the base currency."""

    base: str = "USD"
    rates: Mapping[str, Decimal] = field(default_factory=lambda: {"USD": Decimal(1)})

    @classmethod
    def from_rules(cls, rules: Mapping) -> Money:
        section = rules.get("currency") or {}
        base = str(section.get("base") or "USD").upper()
        rates = {str(k).upper(): Decimal(str(v)) for k, v in (section.get("exchange_rates") or {}).items()}
        rates.setdefault(base, Decimal(1))
        return cls(base=base, rates=rates)

    def to_base(self, minor: int, currency: str | None) -> int | None:
        """`minor` units of `currency` in base minor units; None when the currency has no rate."""
        cur = (currency or self.base).upper()
        if cur == self.base:
            return int(minor)
        rate = self.rates.get(cur)
        if rate is None:
            return None
        units = Decimal(int(minor)).scaleb(-exponent(cur)) * rate
        return int(units.scaleb(exponent(self.base)).to_integral_value(ROUND_HALF_EVEN))

    def minor(self, amount: str | int | Decimal) -> int:
        """A decimal amount of the base currency in minor units."""
        return to_minor(amount, self.base)
