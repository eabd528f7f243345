"""API keys: who may do what. Every generation belongs to the user who started it."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from web import Settings

from .conftest import DEFAULT_ARGS, ServerFactory
from .support import Server, read_events, start_generation, wait_for_status

ALICE = "sk-alice-0123456789abcdef"
BOB = "sk-bob-0123456789abcdef"


@pytest.fixture
def keyed_server(server_factory: ServerFactory, tmp_path: Path) -> Server:
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# users\nalice={ALICE}\n\nbob = {BOB}\n")
    return server_factory(*DEFAULT_ARGS, "--api-keys-file", str(keys))


def as_user(server: Server, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=server.url, timeout=30, headers={"Authorization": f"Bearer {key}"}
    )


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer sk-nobody-0123456789abcdef"},
        {"Authorization": ALICE},
        {"Authorization": "Basic YWxpY2U6c2VjcmV0"},
        {"Authorization": "Bearer"},
    ],
    ids=["missing", "unknown-key", "no-scheme", "basic", "empty"],
)
async def test_requests_without_a_valid_key_are_401(
    keyed_server: Server, headers: dict[str, str]
) -> None:
    async with httpx.AsyncClient(base_url=keyed_server.url, timeout=30) as http:
        for method, path in [
            ("POST", "/v1/generations"),
            ("GET", "/v1/generations/gen_x"),
            ("GET", "/v1/generations/gen_x/events"),
            ("POST", "/v1/generations/gen_x/cancel"),
        ]:
            response = await http.request(method, path, headers=headers, json={"prompt": "hi"})
            assert response.status_code == 401, (method, path, response.text)
            assert response.json()["error"]["type"] == "unauthorized"
            assert response.headers["www-authenticate"] == "Bearer"
        assert (await http.get("/healthz")).status_code == 200  # liveness stays open


async def test_a_users_generations_are_invisible_to_another_user(keyed_server: Server) -> None:
    async with as_user(keyed_server, ALICE) as alice, as_user(keyed_server, BOB) as bob:
        mine = await start_generation(
            alice, prompt="private", params={"tokens_per_second": 20, "max_tokens": 1000}
        )
        gid = mine["id"]
        missing = "gen_doesnotexist0000000"
        for target in (gid, missing):  # a foreign id looks exactly like a missing one
            for method, path in [
                ("GET", f"/v1/generations/{target}"),
                ("GET", f"/v1/generations/{target}/events"),
                ("GET", f"/v1/generations/{target}/events?offset=1"),
                ("POST", f"/v1/generations/{target}/cancel"),
            ]:
                response = await bob.request(method, path)
                assert response.status_code == 404, (method, path)
                assert response.json()["error"]["type"] == "not_found"
        # Bob's cancel did nothing; Alice still sees and controls her generation.
        untouched = (await alice.get(f"/v1/generations/{gid}")).json()
        assert untouched["status"] in ("queued", "running")  # still active
        assert untouched["cancel_requested"] is False
        assert len(await read_events(alice, gid, max_events=2)) == 2
        assert (await alice.post(f"/v1/generations/{gid}/cancel")).json()["status"] == "cancelled"
        finished = await wait_for_status(alice, gid, {"cancelled"})
        assert finished["text"]


async def test_keys_from_the_environment(server_factory: ServerFactory) -> None:
    server = server_factory(*DEFAULT_ARGS, env={"KEEPSTREAM_API_KEYS": f"alice={ALICE}"})
    async with as_user(server, ALICE) as alice:
        generation = await start_generation(alice, prompt="hi", params={"max_tokens": 3})
        assert (await wait_for_status(alice, generation["id"], {"completed"}))["text"]
    async with httpx.AsyncClient(base_url=server.url) as anonymous:
        assert (await anonymous.post("/v1/generations", json={"prompt": "x"})).status_code == 401


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (Settings(api_keys="alice"), "expected user=key"),
        (Settings(api_keys="alice=short"), "at least 16"),
        (Settings(api_keys=f"alice={ALICE},bob={ALICE}"), "listed twice"),
        (Settings(api_keys_file="/nonexistent/keys"), "cannot read"),
    ],
    ids=["no-separator", "short-key", "duplicate", "missing-file"],
)
def test_bad_key_settings_are_refused_at_start(settings: Settings, message: str) -> None:
    from web import create_app

    with pytest.raises(ValueError, match=message):
        create_app(settings)


def test_keys_allow_binding_beyond_loopback() -> None:
    Settings(host="0.0.0.0", api_keys=f"alice={ALICE}").validate()
    with pytest.raises(ValueError, match="without API keys"):
        Settings(host="0.0.0.0").validate()


def test_a_key_in_both_the_setting_and_the_file_is_refused(tmp_path: Path) -> None:
    from web import create_app

    keys = tmp_path / "keys.txt"
    keys.write_text(f"bob={ALICE}\n")
    with pytest.raises(ValueError, match="listed both"):
        create_app(Settings(api_keys=f"alice={ALICE}", api_keys_file=str(keys)))
