"""Generated requests (schemathesis, from the server's own /openapi.json) against a real server
with API keys: every operation, valid and invalid input, no 5xx and no answer that breaks the
published schema. ``bench/fuzz.py`` runs the same for 20,000+ requests."""

from __future__ import annotations

import json
from pathlib import Path

import anyio.to_thread
import httpx

from bench._fuzz import run_schemathesis
from bench._rawfuzz import raw_fuzz
from web import Settings, create_app
from web._openapi import OPERATIONS, documented_routes

from .conftest import ServerFactory

KEY = "sk-fuzz-0123456789abcdef"
MIN_REQUESTS = 2000
SERVER_ARGS = (
    *("--api-keys", f"fuzz={KEY}"),
    *("--sim-tokens-per-second", "0", "--sim-max-tokens", "5"),
    # Live reads end soon, so generated requests never wait long.
    *("--stream-sse-lifetime", "1", "--long-poll-timeout", "0.2"),
)


def test_every_route_is_documented_and_nothing_else() -> None:
    app = create_app(Settings())
    served = {(m, p) for m, p in documented_routes(app.routes) if m != "HEAD"}
    documented = {(m, p) for m, p in OPERATIONS if m != "HEAD"}
    assert served == documented
    assert ("HEAD", "/v1/stream/{name}") in OPERATIONS


async def test_the_document_is_openapi_3_1_with_the_codes_own_types(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(*SERVER_ARGS)
    async with httpx.AsyncClient(base_url=server.url) as http:
        document = (await http.get("/openapi.json")).json()
        page = await http.get("/docs")
        assert page.status_code == 200 and "swagger-ui" in page.text
        script = await http.get("/docs/assets/swagger-ui-bundle.js")
        assert script.status_code == 200 and len(script.content) > 100_000  # no CDN
    assert document["openapi"] == "3.1.0"
    schemas = document["components"]["schemas"]
    create = schemas["CreateGeneration"]
    assert create["additionalProperties"] is False
    assert set(create["properties"]) == {"prompt", "messages", "provider", "model", "params"}
    assert "Generation" in schemas and "SessionWithMessages" in schemas and "Error" in schemas
    post = document["paths"]["/v1/generations"]["post"]
    assert post["responses"]["default"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Error"
    }
    assert document["paths"]["/healthz"]["get"]["security"] == []
    json.dumps(document)  # plain JSON all through


def test_generated_requests_find_no_server_error_and_no_schema_break(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    server = server_factory(*SERVER_ARGS)
    run = run_schemathesis(
        server.url,
        api_key=KEY,
        max_examples=100,
        workers=2,
        seed=20261206,
        request_timeout=1.0,  # a session's event stream follows it while it is open
        cwd=tmp_path,
    )
    assert run.passed, run.output[-6000:]
    assert run.generated >= MIN_REQUESTS, run.output[-2000:]
    log = server.output()
    assert "Traceback" not in log and "unhandled error" not in log, log[-4000:]


async def test_raw_requests_no_schema_would_make_get_no_server_error(
    server_factory: ServerFactory,
) -> None:
    """3,000 requests over plain sockets: any method on any route, broken query strings,
    hostile header values, bodies that are not JSON or not UTF-8, aimed at a real
    generation, session and stream."""
    server = server_factory(*SERVER_ARGS)
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=server.url, headers=headers) as http:
        generation = (await http.post("/v1/generations", json={"prompt": "x"})).json()
        session = (await http.post("/v1/sessions", json={"on_busy": "queue"})).json()
        await http.put("/v1/stream/fuzzed", headers={"Content-Type": "application/json"})
    ids = {"gen": generation["id"], "ses": session["id"]}
    result = await anyio.to_thread.run_sync(
        lambda: raw_fuzz("127.0.0.1", server.port, requests=3000, api_key=KEY, ids=ids)
    )
    assert result.requests == 3000
    assert not result.server_errors, result.server_errors
    assert result.statuses["timeout"] == 0, result.statuses
    assert result.statuses["200"] > 0 and result.statuses["400"] > 0
    log = server.output()
    assert "Traceback" not in log and "unhandled error" not in log, log[-4000:]
