"""The segment filter language of CONTRACTS §3, validated and compiled to parameterised SQL.

A query is a node: `{"all": [node...]}`, `{"any": [node...]}`, `{"not": node}` or a condition
`{"field": ..., "op": ..., "value": ...}`. The SQL refers to `customer_facts` as `c`; every value
travels as a bind parameter, never inside the SQL text.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from services.triggers.money import Money

NUMERIC_OPS = ("eq", "ne", "gt", "gte", "lt", "lte", "in", "not_in")
SET_OPS = ("eq", "ne", "in", "not_in")
_CMP = {"eq": "=", "ne": "<>", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
MAX_DEPTH = 8
MAX_CONDITIONS = 200


class SegmentError(ValueError):
    """A query that does not compile; `path` names the offending part (e.g. `all[1].op`)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


@dataclass
class Compiled:
    """A WHERE clause over `customer_facts c` and its bind parameters ($1..$n)."""

    where: str
    params: list[Any] = field(default_factory=list)


class _Builder:
    def __init__(self, now: dt.datetime, money: Money, first_param: int) -> None:
        self.now = now
        self.money = money
        self.params: list[Any] = []
        self.first = first_param
        self.conditions = 0

    def bind(self, value: Any, cast: str) -> str:
        self.params.append(value)
        return f"${self.first + len(self.params) - 1}::{cast}"


@dataclass(frozen=True)
class _Field:
    ops: tuple[str, ...]
    value: Callable[[Any, str], Any]  # parse one value (raises ValueError)
    cast: str
    sql: Callable[[_Builder, str, Any], str]


def _int(lo: int | None = None, hi: int | None = None) -> Callable[[Any, str], int]:
    def parse(v: Any, _: str) -> int:
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            raise ValueError("must be an integer")
        try:
            n = int(v)
        except ValueError as exc:
            raise ValueError("must be an integer") from exc
        if (lo is not None and n < lo) or (hi is not None and n > hi):
            raise ValueError(f"must be between {lo} and {hi}")
        return n
    return parse


def _text(v: Any, _: str) -> str:
    if not isinstance(v, str) or not v or len(v) > 200:
        raise ValueError("must be a non-empty string")
    return v


def _money(v: Any, _: str) -> Decimal:
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise ValueError("must be a decimal string such as \"5000\" or an integer")
    try:
        d = Decimal(str(v))
    except InvalidOperation as exc:
        raise ValueError("must be a decimal string such as \"5000\"") from exc
    if not d.is_finite():
        raise ValueError("must be finite")
    return d


def _compare(b: _Builder, expr: str, op: str, value: Any, cast: str) -> str:
    if op in ("in", "not_in"):
        p = b.bind(list(value), f"{cast}[]")
        return f"({expr} = ANY({p}))" if op == "in" else f"({expr} IS NULL OR NOT ({expr} = ANY({p})))"
    p = b.bind(value, cast)
    if op == "ne":
        return f"({expr} IS DISTINCT FROM {p})"
    return f"({expr} {_CMP[op]} {p})"


def _field(expr: str | Callable[[_Builder], str], ops: tuple[str, ...], parse, cast: str) -> _Field:
    def sql(b: _Builder, op: str, value: Any) -> str:
        e = expr(b) if callable(expr) else expr
        return _compare(b, e, op, value, cast)
    return _Field(ops, parse, cast, sql)


def _trailing_spend(b: _Builder) -> str:
    since = b.bind(b.now - dt.timedelta(days=365), "timestamptz")
    until = b.bind(b.now, "timestamptz")
    return ("COALESCE((SELECT sum(p.amount) FROM purchases p WHERE p.customer_id = c.customer_id"
            f" AND p.occurred_at > {since} AND p.occurred_at <= {until}), 0)")


def _days_ago(b: _Builder) -> str:
    now = b.bind(b.now, "timestamptz")
    return f"floor(extract(epoch FROM ({now} - c.last_purchase_at)) / 86400)::bigint"


def _membership(column_sql: Callable[[_Builder, Any], str]) -> _Field:
    """Fields true when the customer has a value (tag, category, channel): eq/in = has, ne/not_in = has not."""
    def sql(b: _Builder, op: str, value: Any) -> str:
        values = list(value) if op in ("in", "not_in") else [value]
        has = column_sql(b, values)
        return has if op in ("eq", "in") else f"(NOT {has})"
    return _Field(SET_OPS, _text, "text", sql)


def _array_overlap(column: str) -> Callable[[_Builder, Any], str]:
    return lambda b, values: f"(c.{column} && {b.bind(values, 'text[]')})"


def _category(b: _Builder, values: Any) -> str:
    p = b.bind(values, "text[]")
    return (f"(EXISTS (SELECT 1 FROM category_facts cf WHERE cf.customer_id = c.customer_id"
            f" AND cf.category = ANY({p})))")


FIELDS: dict[str, _Field] = {
    "tier": _field("c.tier", SET_OPS, _text, "text"),
    "trailing_spend": _field(_trailing_spend, NUMERIC_OPS, _money, "bigint"),
    "lifetime_spend": _field("c.lifetime_spend", NUMERIC_OPS, _money, "bigint"),
    "orders_count": _field("c.orders_count", NUMERIC_OPS, _int(0), "bigint"),
    "last_purchase_days_ago": _field(_days_ago, NUMERIC_OPS, _int(0), "bigint"),
    "birthday_month": _field("c.birthday_month", NUMERIC_OPS, _int(1, 12), "int"),
    "home_store_id": _field("c.home_store_id", SET_OPS, _text, "text"),
    "city": _field("c.city", SET_OPS, _text, "text"),
    "country": _field("c.country", SET_OPS, lambda v, p: _text(v, p).upper(), "text"),
    "purchased_category": _membership(_category),
    "tag": _membership(_array_overlap("tags")),
    "consented_channel": _membership(_array_overlap("consented_channels")),
}
MONEY_FIELDS = frozenset({"trailing_spend", "lifetime_spend"})


def compile_segment(query: Any, *, now: dt.datetime, money: Money | None = None,
                    first_param: int = 1) -> Compiled:
    """Validate `query` and compile it; raises SegmentError naming the first bad part."""
    if not isinstance(query, dict):
        raise SegmentError("segment", "must be an object with `all`, `any`, `not` or a condition")
    b = _Builder(now, money or Money(), first_param)
    where = _node(b, query, "", 0)
    return Compiled(where, b.params)


def _node(b: _Builder, node: Any, path: str, depth: int) -> str:
    here = path or "segment"
    if depth > MAX_DEPTH:
        raise SegmentError(here, f"nested deeper than {MAX_DEPTH}")
    if not isinstance(node, dict):
        raise SegmentError(here, "must be an object")
    combinators = [k for k in ("all", "any", "not") if k in node]
    if combinators:
        if len(node) != 1:
            extra = sorted(set(node) - {combinators[0]})
            raise SegmentError(here, f"unexpected key {extra[0]!r} beside {combinators[0]!r}")
        key = combinators[0]
        sub_path = f"{path}.{key}" if path else key
        if key == "not":
            return f"(NOT {_node(b, node['not'], sub_path, depth + 1)})"
        children = node[key]
        if not isinstance(children, list):
            raise SegmentError(sub_path, "must be a list")
        if not children:
            return "TRUE" if key == "all" else "FALSE"
        parts = [_node(b, child, f"{sub_path}[{i}]", depth + 1) for i, child in enumerate(children)]
        return "(" + (" AND " if key == "all" else " OR ").join(parts) + ")"
    return _condition(b, node, path)


def _condition(b: _Builder, node: dict, path: str) -> str:
    prefix = f"{path}." if path else ""
    unknown = sorted(set(node) - {"field", "op", "value"})
    if unknown:
        raise SegmentError(f"{prefix}{unknown[0]}", f"unknown key {unknown[0]!r}")
    b.conditions += 1
    if b.conditions > MAX_CONDITIONS:
        raise SegmentError(path or "segment", f"more than {MAX_CONDITIONS} conditions")
    name = node.get("field")
    spec = FIELDS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise SegmentError(f"{prefix}field", f"unknown field {name!r}; one of {', '.join(FIELDS)}")
    op = node.get("op")
    if op not in spec.ops:
        raise SegmentError(f"{prefix}op", f"operator {op!r} is not valid for {name}; one of {', '.join(spec.ops)}")
    if "value" not in node:
        raise SegmentError(f"{prefix}value", "is required")
    raw = node["value"]
    try:
        if op in ("in", "not_in"):
            if not isinstance(raw, list) or not raw or len(raw) > 1000:
                raise ValueError("must be a non-empty list (at most 1000 values)")
            value: Any = [spec.value(v, name) for v in raw]
        else:
            value = spec.value(raw, name)
        if name in MONEY_FIELDS:
            value = [b.money.minor(v) for v in value] if isinstance(value, list) else b.money.minor(value)
    except ValueError as exc:
        raise SegmentError(f"{prefix}value", f"{name}: {exc}") from None
    return spec.sql(b, op, value)
