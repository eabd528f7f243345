"""``keepstream serve`` runs packaged generator code: ``--provider-factory`` and the
``keepstream.providers`` entry-point group, in a real server process."""

from __future__ import annotations

import textwrap
from pathlib import Path

import httpx
import pytest

from .conftest import ServerFactory
from .support import ROOT, read_events, start_generation, text_of, wait_for_status

PLUGIN = '''
"""A packaged provider, as a team would ship one."""

from collections.abc import AsyncIterator

import anyio

from keepstream import GeneratorInput, Settings


async def shout(request: GeneratorInput) -> AsyncIterator[str]:
    for word in request.prompt.split():
        await anyio.sleep(0.001)
        yield word.upper() + " "


async def whisper(request: GeneratorInput) -> AsyncIterator[str]:
    yield request.prompt.lower()


def factory(settings: Settings) -> dict[str, object]:
    return {"shout": shout}


def from_entry_point(settings: Settings) -> dict[str, object]:
    return {"whisper": whisper}


def broken(settings: Settings) -> dict[str, object]:
    raise RuntimeError("no licence key")
'''


@pytest.fixture
def plugin_path(tmp_path: Path) -> Path:
    """A folder holding the module ``acme_plugin`` and its installed metadata (an entry
    point in the ``keepstream.providers`` group), as ``pip install`` would leave them."""
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "acme_plugin.py").write_text(textwrap.dedent(PLUGIN))
    info = folder / "acme_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[keepstream.providers]\nacme = acme_plugin:from_entry_point\n"
    )
    return folder


def env_with(folder: Path) -> dict[str, str]:
    return {"PYTHONPATH": f"{ROOT}:{folder}"}


async def test_a_factory_and_an_entry_point_add_providers(
    server_factory: ServerFactory, plugin_path: Path
) -> None:
    server = server_factory(
        "--provider-factory",
        "acme_plugin:factory",
        "--provider",
        "shout",
        env=env_with(plugin_path),
    )
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        shouted = await start_generation(http, prompt="keep every token")  # the default
        whispered = await start_generation(http, prompt="QUIET PLEASE", provider="whisper")
        for generation in (shouted, whispered):
            await wait_for_status(http, generation["id"], {"completed"})
        assert text_of(await read_events(http, shouted["id"])) == "KEEP EVERY TOKEN "
        assert text_of(await read_events(http, whispered["id"])) == "quiet please"
        unknown = await http.post("/v1/generations", json={"prompt": "x", "provider": "nope"})
        assert unknown.status_code == 422
        assert "shout" in unknown.json()["error"]["message"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("acme_plugin", "expected package.module:callable"),
        ("no_such_module:factory", "cannot import no_such_module"),
        ("acme_plugin:missing", "acme_plugin has no missing"),
        ("acme_plugin:broken", "RuntimeError: no licence key"),
        ("acme_plugin:from_entry_point", "already added provider 'whisper'"),
    ],
    ids=["no-colon", "no-module", "no-attribute", "raises", "duplicate"],
)
def test_a_bad_factory_stops_the_start_with_its_reason(
    server_factory: ServerFactory, plugin_path: Path, spec: str, message: str
) -> None:
    with pytest.raises(RuntimeError, match="server exited with 2") as failed:
        server_factory("--provider-factory", spec, env=env_with(plugin_path))
    assert message in str(failed.value)


def test_a_default_provider_nobody_adds_is_refused(server_factory: ServerFactory) -> None:
    with pytest.raises(RuntimeError, match="server exited with 2") as failed:
        server_factory("--provider", "shout")
    assert "the default provider 'shout' is not configured" in str(failed.value)
