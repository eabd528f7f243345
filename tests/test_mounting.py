"""The HTTP API mounted under a prefix in a host Starlette app, with the host's own
authentication: every URL it answers with carries the prefix; owners come from the host."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from keepstream import Keepstream, Settings

USERS = {"token-ann": "ann", "token-bob": "bob"}


def host_auth(request: Request) -> str:
    """The host's own rule: a bearer token from its table, else 401."""
    token = request.headers.get("authorization", "").removeprefix("Bearer ")
    if token not in USERS:
        raise HTTPException(401, "log in first")
    return USERS[token]


@pytest.fixture
async def mounted(tmp_path: Path) -> AsyncIterator[tuple[Keepstream, httpx.AsyncClient]]:
    ks = Keepstream(
        Settings(db=str(tmp_path / "host.db"), shutdown_grace=0.5),
        authenticate=host_auth,
        url_prefix="/ks",
    )

    async def home(request: Request) -> PlainTextResponse:
        return PlainTextResponse("the host's own page")

    host = Starlette(routes=[Route("/", home), Mount("/ks", app=ks.asgi_app())])
    transport = httpx.ASGITransport(app=host)
    async with httpx.AsyncClient(transport=transport, base_url="http://host") as http:
        yield ks, http


def as_(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer token-{user}"}


async def test_urls_carry_the_prefix_and_owners_come_from_the_host(
    mounted: tuple[Keepstream, httpx.AsyncClient],
) -> None:
    ks, http = mounted
    assert (await http.get("/ks/v1/sessions", headers=as_("ann"))).json()["error"]["type"] == (
        "not_started"
    )
    async with ks:
        assert (await http.get("/")).text == "the host's own page"
        started = await http.post(
            "/ks/v1/generations",
            json={"prompt": "hi", "params": {"max_tokens": 3}},
            headers=as_("ann"),
        )
        assert started.status_code == 202, started.text
        body = started.json()
        assert started.headers["location"] == f"/ks/v1/generations/{body['id']}"
        assert body["url"] == started.headers["location"]
        assert body["events_url"] == f"/ks/v1/generations/{body['id']}/events"
        signed = (
            await http.post(f"/ks/v1/generations/{body['id']}/events-url", headers=as_("ann"))
        ).json()
        assert signed["url"].startswith(f"/ks/v1/generations/{body['id']}/events?token=")
        assert (await http.get(signed["url"])).status_code == 200  # no header: the token

        session = await http.post("/ks/v1/sessions", json={"title": "t"}, headers=as_("ann"))
        assert session.headers["location"].startswith("/ks/v1/sessions/ses_")
        assert session.json()["url"] == session.headers["location"]

        stream = await http.put("/ks/v1/stream/notes", headers=as_("ann"))
        assert stream.status_code == 201
        assert stream.headers["location"] == "http://host/ks/v1/stream/notes"
        assert stream.headers["access-control-allow-origin"] == "*"  # its own CORS rule

        # Bob is a different owner to keepstream: Ann's generation does not exist for him.
        other = await http.get(f"/ks/v1/generations/{body['id']}", headers=as_("bob"))
        assert other.status_code == 404
        refused = await http.get(f"/ks/v1/generations/{body['id']}")
        assert refused.status_code == 401
        assert refused.json()["error"] == {"type": "unauthorized", "message": "log in first"}
        # The Python API's snapshots name the same URLs as the mounted HTTP API.
        assert (await ks.get(body["id"], owner="ann")).url == body["url"]


async def test_the_api_reference_works_under_the_prefix(
    mounted: tuple[Keepstream, httpx.AsyncClient],
) -> None:
    ks, http = mounted
    async with ks:
        document = (await http.get("/ks/openapi.json")).json()
        assert document["servers"] == [{"url": "/ks"}]
        page = (await http.get("/ks/docs")).text
        for asset in ("docs/assets/swagger-ui.css", "docs/assets/swagger-ui-bundle.js"):
            assert f'"{asset}"' in page  # relative: resolves under /ks/
            assert (await http.get(f"/ks/{asset}")).status_code == 200
        assert 'url: "openapi.json"' in (await http.get("/ks/docs/init.js")).text
