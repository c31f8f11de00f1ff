"""`omnicrm erase-report | rekey | backtest`: what an operator answering a data-subject request or
rotating the data key runs, and what a developer changing the trigger rules runs.

`erase-report CUSTOMER_ID` asks every service's `GET /v1/erasures/{id}` (admin scope) and prints
where the customer's erasure was applied, when, and what each service dropped. `rekey` re-seals
the contact data of identity and notifications under the active key of OMNICRM_DATA_KEYS after a
key rotation (see shared/crypto.py), through each service's own `store.rekey(conn, vault)`.
`backtest` replays recorded events through the trigger rules in process (shared/backtest.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import httpx
import orjson
import typer

from shared.config import DEV_KEY_SECRET, SERVICE_PORTS, Settings, load_settings
from shared.crypto import Vault
from shared.db import create_pool
from shared.errors import ConfigError, OmnicrmError

REPORT_SERVICES = tuple(SERVICE_PORTS)  # ingestion, identity, loyalty, triggers, notifications
REKEY_SERVICES = ("identity", "notifications")
# The services' own 404 for a customer without a record; any other 404 means no such endpoint.
_NOTHING_RECORDED = "no erasure recorded"

ERASED, NOTHING, UNREACHABLE, UNSUPPORTED, REFUSED, FAILED = (
    "erased", "nothing recorded", "unreachable", "not supported", "key refused", "error")


def _fail(message: str) -> None:
    typer.echo(f"omnicrm: {message}", err=True)
    raise typer.Exit(1)


def admin_key(settings: Settings) -> str:
    """The secret of the first key with the admin scope, else the dev key (embedded default)."""
    for key in settings.api_keys:
        if "admin" in key.scopes:
            return key.secret
    return DEV_KEY_SECRET


# -- erase report ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ErasureAnswer:
    """One service's answer about one customer's erasure."""

    service: str
    status: str                      # one of ERASED, NOTHING, UNREACHABLE, UNSUPPORTED, REFUSED, FAILED
    erased_at: str | None = None
    what: tuple[str, ...] = ()
    detail: str = ""


def service_urls(settings: Settings, services: Sequence[str] = REPORT_SERVICES) -> dict[str, str]:
    return {s: f"http://{settings.host}:{settings.port(s)}" for s in services}


async def collect_erasures(urls: Mapping[str, str], customer_id: str, key: str, *,
                           transport: httpx.AsyncBaseTransport | None = None,
                           timeout: float = 5.0) -> list[ErasureAnswer]:
    """Ask every service at once; a service that does not answer is reported, never fatal."""
    path = f"/v1/erasures/{quote(customer_id, safe='')}"
    headers = {"Authorization": f"Bearer {key}", "Accept": "application/json"}
    async with httpx.AsyncClient(transport=transport, timeout=timeout, headers=headers) as client:
        return list(await asyncio.gather(*(_ask(client, name, url + path)
                                           for name, url in urls.items())))


async def _ask(client: httpx.AsyncClient, service: str, url: str) -> ErasureAnswer:
    try:
        r = await client.get(url)
    except httpx.HTTPError as exc:
        return ErasureAnswer(service, UNREACHABLE, detail=type(exc).__name__)
    body = _json(r)
    if r.status_code == 200 and isinstance(body, dict) and isinstance(body.get("erased_at"), str):
        what = body.get("what")
        return ErasureAnswer(service, ERASED, body["erased_at"],
                             tuple(str(w) for w in what) if isinstance(what, list) else ())
    if r.status_code == 404:
        message = str(body.get("message", "")) if isinstance(body, dict) else ""
        if message.startswith(_NOTHING_RECORDED):
            return ErasureAnswer(service, NOTHING)
        return ErasureAnswer(service, UNSUPPORTED, detail="no erasure endpoint")
    if r.status_code in (401, 403):
        return ErasureAnswer(service, REFUSED, detail=f"HTTP {r.status_code}: the key needs the admin scope")
    return ErasureAnswer(service, FAILED, detail=f"HTTP {r.status_code}")


def _json(r: httpx.Response) -> Any:
    try:
        return orjson.loads(r.content)
    except orjson.JSONDecodeError:
        return None


def render_report(customer_id: str, answers: Sequence[ErasureAnswer]) -> str:
    """A plain table: one line per service, erased_at and what, or why there is nothing."""
    lines = [f"erasure of customer {customer_id}", f"{'service':<14} {'erased_at':<32} what"]
    for a in answers:
        if a.status == ERASED:
            lines.append(f"{a.service:<14} {a.erased_at:<32} {', '.join(a.what) or '-'}")
        else:
            lines.append(f"{a.service:<14} {'-':<32} {a.status}" + (f" ({a.detail})" if a.detail else ""))
    done = sum(a.status == ERASED for a in answers)
    lines.append(f"{done} of {len(answers)} services recorded the erasure")
    return "\n".join(lines)


def erase_report(
    customer_id: str = typer.Argument(..., help="the customer id whose erasure to report"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per service instead of a table"),
    timeout: float = typer.Option(5.0, min=0.1, help="seconds to wait for each service"),
) -> None:
    """Where a customer's erasure was applied, when, and what each service dropped."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        _fail(str(exc))
    answers = asyncio.run(collect_erasures(service_urls(settings), customer_id, admin_key(settings),
                                           timeout=timeout))
    if as_json:
        for a in answers:
            typer.echo(orjson.dumps(dataclasses.asdict(a)).decode())
    else:
        typer.echo(render_report(customer_id, answers))


# -- rekey -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RekeyOutcome:
    """What `rekey` did for one service: `report` is the service's own answer."""

    service: str
    status: str                      # "done", "not supported", "no schema"
    report: Any = None

    @property
    def unreadable(self) -> int:
        return int(getattr(self.report, "unreadable", 0) or 0)

    def describe(self) -> str:
        if self.status == "not supported":
            return "not supported (this service has no rekey yet)"
        if self.status == "no schema":
            return "nothing to do (its schema does not exist in this database)"
        r = self.report
        if hasattr(r, "resealed"):
            text = f"resealed {r.resealed} row(s)"
            if getattr(r, "active_key_id", None):
                text += f" under key {r.active_key_id}"
            if self.unreadable:
                text += (f"; {self.unreadable} row(s) sealed with a key not in OMNICRM_DATA_KEYS "
                         "(left as they are)")
            return text
        if dataclasses.is_dataclass(r) and not isinstance(r, type):
            return ", ".join(f"{k} {v}" for k, v in dataclasses.asdict(r).items())
        return f"done ({r})" if r is not None else "done"


def rekey_function(service: str) -> Callable[..., Any] | None:
    """`services.<service>.store.rekey`, None when the service does not offer one."""
    try:
        module = importlib.import_module(f"services.{service}.store")
    except ImportError:
        return None
    fn = getattr(module, "rekey", None)
    return fn if callable(fn) else None


async def rekey_services(dsn: str, vault: Vault, schemas: Mapping[str, str] | None = None) -> list[RekeyOutcome]:
    """Re-seal each service's rows under the vault's active key, each in its own schema."""
    schemas = schemas or {s: s for s in REKEY_SERVICES}
    out: list[RekeyOutcome] = []
    for service, schema in schemas.items():
        fn = rekey_function(service)
        if fn is None:
            out.append(RekeyOutcome(service, "not supported"))
            continue
        pool = await create_pool(dsn, schema, min_size=1, max_size=1, statement_timeout_ms=0)
        try:
            async with pool.acquire() as conn:
                if not await conn.fetchval(
                        "SELECT true FROM information_schema.schemata WHERE schema_name = $1", schema):
                    out.append(RekeyOutcome(service, "no schema"))
                    continue
                out.append(RekeyOutcome(service, "done", await fn(conn, vault)))
        finally:
            await pool.close()
    return out


def rekey() -> None:
    """Re-seal identity's and notifications' contact data under the active key of OMNICRM_DATA_KEYS.

    Run after putting a new key first in OMNICRM_DATA_KEYS (old keys still listed) and restarting
    the services; drop the old key only after a run that reports no row left under it.
    """
    try:
        settings = load_settings()
        vault = Vault.from_env(embedded=settings.embedded)
    except ConfigError as exc:
        _fail(str(exc))
    if not settings.database_url:
        _fail("DATABASE_URL: not set (rekey works on the services' database)")
    typer.echo(f"re-sealing under key {vault.active_key_id} ...")
    try:
        outcomes = asyncio.run(rekey_services(settings.database_url, vault))
    except (OmnicrmError, asyncpg.PostgresError, OSError) as exc:
        _fail(f"rekey stopped: {type(exc).__name__}: {exc}; it is safe to run again")
    for o in outcomes:
        typer.echo(f"{o.service:<14} {o.describe()}")
    left = sum(o.unreadable for o in outcomes)
    if left:
        _fail(f"{left} row(s) could not be opened: keep their key in OMNICRM_DATA_KEYS and run again")


# -- backtest --------------------------------------------------------------------------------------

def backtest(
    rules: Path = typer.Option(..., "--rules", help="the changed rules YAML (may hold only the settings it changes)"),
    input_path: Path = typer.Option(..., "--input", help="recorded events: JSONL envelopes (omnicrm generate --out) or an export of ingest.raw.v1"),
    base_rules: Path | None = typer.Option(None, "--base-rules", help="the current rules (default: deploy/config/rules.yaml, or OMNICRM_RULES)"),
    limit: int = typer.Option(20, min=0, help="customers that differ to list"),
    as_json: bool = typer.Option(False, "--json", help="print the comparison as JSON"),
) -> None:
    """What a changed rule set would have fired over recorded traffic, beside the current rules."""
    from shared.backtest import BacktestError, load_rule_set, read_events, render
    from shared.backtest import as_json as comparison_json
    from shared.backtest import backtest as run_backtest
    from shared.rules import load_rules

    try:
        current = load_rules(base_rules)
        changed = load_rule_set(rules, base=current)
        typer.echo(f"backtesting {input_path} (nothing is sent, no database is used) ...", err=True)
        result = run_backtest(read_events(input_path), current, changed)
    except (BacktestError, ConfigError) as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(orjson.dumps(comparison_json(result, limit=limit)).decode())
    else:
        typer.echo(render(result, limit=limit, new_name=rules.stem[:10] or "new"))


def register(app: typer.Typer) -> None:
    app.command("erase-report")(erase_report)
    app.command("rekey")(rekey)
    app.command("backtest")(backtest)
