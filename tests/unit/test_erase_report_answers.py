"""The erase report's reading of each service's answer, over an httpx MockTransport (no network)."""

from __future__ import annotations

import asyncio

import httpx

from shared.cli_privacy import (
    ERASED,
    FAILED,
    NOTHING,
    REFUSED,
    UNREACHABLE,
    UNSUPPORTED,
    admin_key,
    collect_erasures,
    render_report,
)
from shared.config import DEV_KEY_SECRET, load_settings


def handler(request: httpx.Request) -> httpx.Response:
    host = request.url.host
    assert request.url.raw_path == b"/v1/erasures/c%2F1"  # the id is one path segment
    if request.headers["authorization"] != "Bearer adm":
        return httpx.Response(403, json={"error": "forbidden"})
    if host == "loyalty":
        return httpx.Response(200, json={"service": "loyalty", "customer_id": "c/1",
                                         "erased_at": "2026-06-10T12:00:00+00:00", "what": ["order_refs"]})
    if host == "triggers":
        return httpx.Response(404, json={"error": "not_found", "message": "no erasure recorded for this customer"})
    if host == "identity":
        return httpx.Response(404, json={"error": "not_found", "message": "Not Found"})
    if host == "ingestion":
        return httpx.Response(500, text="boom")
    raise httpx.ConnectError("refused", request=request)


def test_each_kind_of_answer_is_reported_and_none_is_fatal():
    urls = {s: f"http://{s}" for s in ("ingestion", "identity", "loyalty", "triggers", "notifications")}
    answers = asyncio.run(collect_erasures(urls, "c/1", "adm", transport=httpx.MockTransport(handler)))
    by = {a.service: a for a in answers}
    assert by["loyalty"].status == ERASED and by["loyalty"].what == ("order_refs",)
    assert (by["triggers"].status, by["identity"].status, by["ingestion"].status,
            by["notifications"].status) == (NOTHING, UNSUPPORTED, FAILED, UNREACHABLE)
    table = render_report("c/1", answers)
    assert "2026-06-10T12:00:00+00:00" in table and table.endswith("1 of 5 services recorded the erasure")
    refused = asyncio.run(collect_erasures({"loyalty": "http://loyalty"}, "c/1", "nope",
                                           transport=httpx.MockTransport(handler)))
    assert refused[0].status == REFUSED


def test_the_admin_key_is_the_first_with_the_scope_else_the_dev_key():
    keys = "r:read1:read,a:adm1:admin|read,b:adm2:admin"
    assert admin_key(load_settings({"OMNICRM_API_KEYS": keys})) == "adm1"
    assert admin_key(load_settings({"OMNICRM_API_KEYS": "r:read1:read"})) == DEV_KEY_SECRET
