"""The examples and the README's embedding code, run as they are: the FastAPI app under a real
uvicorn, the scripts as ``python -m examples....``."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx
import pytest
from httpx_sse import ServerSentEvent, aconnect_sse, connect_sse
from langchain_core.messages import BaseMessage
from langchain_core.runnables import RunnableLambda

from examples.fastapi_app import answer_for
from examples.langchain_provider import FAKE_ANSWER, langchain_provider
from keepstream import Delta, Keepstream, Settings

from .support import ROOT, final_status, free_port, spawn_until_ready, text_of

ALICE = {"Authorization": "Bearer alice-example-token"}
BOB = {"Authorization": "Bearer bob-example-token"}
# Fast enough for the tests, slow enough that a reader can drop out mid-answer.
ANSWER_SECONDS = "2"
SCRIPT_TIMEOUT = 60.0
# What examples/follow_without_http.py prints: one line per event, then the snapshot.
EVENT_LINE = re.compile(r"(status|delta) +@(\d+): (.*)")
COUNTDOWN = "5... 4... 3... 2... 1... liftoff"


@dataclass
class HostApp:
    """``uvicorn <target>`` on 127.0.0.1 and a free port, from ``app_dir``."""

    target: str
    app_dir: Path
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_path: str) -> HostApp:
        """Start uvicorn and wait until ``ready_path`` answers 200 (the lifespan has run by
        then: uvicorn accepts nothing before)."""
        command = [
            *(sys.executable, "-m", "uvicorn", self.target),
            *("--app-dir", str(self.app_dir), "--port", str(self.port)),
            *("--log-level", "warning"),
        ]
        self.proc = spawn_until_ready(
            command,
            env=self.env,
            log=self.log,
            ready_url=self.url + ready_path,
            name="uvicorn",
            cwd=self.app_dir,
        )
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def example_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostApp]:
    """``examples/fastapi_app.py`` under uvicorn, on a database of its own."""
    tmp = tmp_path_factory.mktemp("fastapi_app")
    app = HostApp(
        "examples.fastapi_app:app",
        app_dir=ROOT,
        log=tmp / "uvicorn.log",
        env={"KEEPSTREAM_DB": str(tmp / "app.db"), "EXAMPLE_ANSWER_SECONDS": ANSWER_SECONDS},
    )
    try:
        yield app.start("/")
    finally:
        app.kill()


@pytest.fixture
async def host(example_app: HostApp) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for the example app's root (its own routes, and keepstream's at /ks)."""
    async with httpx.AsyncClient(base_url=example_app.url, timeout=30.0) as http:
        yield http


async def read_sse(
    client: httpx.AsyncClient,
    url: str,
    *,
    headers: dict[str, str],
    max_events: int | None = None,
) -> list[ServerSentEvent]:
    """The events of ``url`` until the stream ends, or the first ``max_events`` of them (the
    connection is then dropped)."""
    events: list[ServerSentEvent] = []
    with anyio.fail_after(SCRIPT_TIMEOUT):
        # A copy: aconnect_sse adds its Accept header to the dict it is given.
        async with aconnect_sse(client, "GET", url, headers=dict(headers)) as source:
            assert source.response.status_code == 200, source.response.status_code
            async for sse in source.aiter_sse():
                if sse.data:  # skip retry: lines and keep-alives
                    events.append(sse)
                if max_events is not None and len(events) >= max_events:
                    break
    return events


def offsets(events: Sequence[ServerSentEvent]) -> list[int]:
    """The events' ids, as offsets."""
    return [int(sse.id) for sse in events]


async def test_fastapi_example_resumes_exactly_under_its_prefix(host: httpx.AsyncClient) -> None:
    prompt = "durable answers"
    response = await host.post(
        "/ks/v1/generations", json={"prompt": prompt, "provider": "custom"}, headers=ALICE
    )
    assert response.status_code == 202, response.text
    body = response.json()
    generation_id = body["id"]
    assert response.headers["location"] == f"/ks/v1/generations/{generation_id}"
    assert body["events_url"].startswith(f"/ks/v1/generations/{generation_id}/events")

    # Drop the connection a few events in, mid-answer, then resume from the last id seen.
    first = await read_sse(host, body["events_url"], headers=ALICE, max_events=4)
    assert final_status(first) == "running"
    rest = await read_sse(
        host, body["events_url"], headers={**ALICE, "Last-Event-ID": first[-1].id}
    )
    events = [*first, *rest]
    assert offsets(events) == list(range(1, len(events) + 1))
    assert final_status(events) == "completed"

    snapshot = (await host.get(f"/ks/v1/generations/{generation_id}", headers=ALICE)).json()
    assert snapshot["status"] == "completed"
    assert snapshot["next_offset"] == len(events)
    assert text_of(events) == snapshot["text"] == answer_for(prompt)


async def test_fastapi_example_keeps_owners_apart_and_its_own_route(
    host: httpx.AsyncClient,
) -> None:
    started = await host.post(
        "/ks/v1/generations", json={"prompt": "mine", "provider": "custom"}, headers=ALICE
    )
    assert started.status_code == 202, started.text
    path = f"/ks/v1/generations/{started.json()['id']}"

    for method, url in (("GET", path), ("GET", f"{path}/events"), ("POST", f"{path}/cancel")):
        foreign = await host.request(method, url, headers=BOB)
        assert foreign.status_code == 404, (method, url, foreign.text)
    for headers in ({}, {"Authorization": "Bearer not-a-token"}):
        assert (await host.get(path, headers=headers)).status_code == 401
        refused = await host.post("/ks/v1/generations", json={"prompt": "x"}, headers=headers)
        assert refused.status_code == 401

    home = await host.get("/")
    assert home.status_code == 200
    assert home.json()["app"] == "keepstream example"
    mine = await host.post(f"{path}/cancel", headers=ALICE)
    assert mine.json()["status"] in {"cancelled", "completed"}


def run_script(args: Sequence[str], *, tmp_path: Path, cwd: Path = ROOT) -> str:
    """Run ``python <args>`` on a database in ``tmp_path``; its stdout, once it exits 0."""
    done = subprocess.run(
        [sys.executable, *args],
        env={**os.environ, "PYTHONPATH": str(ROOT), "KEEPSTREAM_DB": str(tmp_path / "ks.db")},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_langchain_example_prints_the_fake_models_answer(tmp_path: Path) -> None:
    output = run_script(["-m", "examples.langchain_provider"], tmp_path=tmp_path)
    assert output == f"{FAKE_ANSWER}\n[completed]\n"


async def test_langchain_adaptor_passes_the_conversation_and_takes_plain_text(
    tmp_path: Path,
) -> None:
    def transcript(messages: list[BaseMessage]) -> str:
        return " | ".join(f"{m.type}: {m.text}" for m in messages)

    ks = Keepstream(Settings(db=str(tmp_path / "ks.db")))
    ks.add_provider("chain", langchain_provider(RunnableLambda(transcript)))
    with anyio.fail_after(SCRIPT_TIMEOUT):
        async with ks:
            generation = await ks.start(
                messages=[
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "again"},
                ],
                provider="chain",
            )
            events = [event async for event in ks.follow(generation.id)]
            snapshot = await ks.get(generation.id)
    text = "".join(event.text for event in events if isinstance(event, Delta))
    assert snapshot.status == "completed"
    assert text == snapshot.text == "system: be brief | human: hi | ai: hello | human: again"


def test_plain_script_follows_without_http(tmp_path: Path) -> None:
    *event_lines, snapshot_line = run_script(
        ["-m", "examples.follow_without_http"], tmp_path=tmp_path
    ).splitlines()
    events = [EVENT_LINE.fullmatch(line) for line in event_lines]
    assert all(events), event_lines
    kinds = [(m[1], int(m[2]), m[3]) for m in events if m is not None]
    assert [offset for _, offset, _ in kinds] == list(range(1, len(kinds) + 1))
    assert [(kind, shown) for kind, _, shown in kinds if kind == "status"] == [
        ("status", "running"),
        ("status", "completed"),
    ]
    assert kinds[-1][0] == "status"
    text = "".join(ast.literal_eval(shown) for kind, _, shown in kinds if kind == "delta")
    assert text == COUNTDOWN
    usage = {"input_tokens": 0, "output_tokens": 6}
    assert snapshot_line == f"snapshot: completed {COUNTDOWN!r} usage={usage}"


def readme_python_blocks() -> list[str]:
    """The fenced python blocks of the README's Embedding section, in order."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("\n## Embedding\n") : readme.index("\n## Settings\n")]
    return [part.split("\n```", 1)[0] for part in section.split("```python\n")[1:]]


def test_readme_embedding_app_runs_as_written(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(readme_python_blocks()[0])
    app = HostApp(
        "app:app",
        app_dir=tmp_path,
        log=tmp_path / "uvicorn.log",
        env={"KEEPSTREAM_DB": str(tmp_path / "app.db")},
    ).start("/")
    try:
        with httpx.Client(base_url=app.url, timeout=30.0) as http:
            alice = {"Authorization": "Bearer token-of-alice"}
            started = http.post(
                "/ks/v1/generations",
                json={"prompt": "durable answers here", "provider": "echo"},
                headers=alice,
            )
            assert started.status_code == 202, started.text
            generation = started.json()
            assert started.headers["location"] == generation["url"]
            assert generation["url"] == f"/ks/v1/generations/{generation['id']}"
            bob = {"Authorization": "Bearer token-of-bob"}
            assert http.get(generation["url"], headers=bob).status_code == 404
            assert http.get(generation["url"]).status_code == 401
            assert http.get("/").json() == {"hello": "from your own app"}
            with connect_sse(http, "GET", generation["events_url"], headers=alice) as source:
                events = [sse for sse in source.iter_sse() if sse.data]
            assert final_status(events) == "completed"
            assert text_of(events) == "durable answers here "
            assert http.get(generation["url"], headers=alice).json()["text"] == text_of(events)
    finally:
        app.kill()


def test_readme_embedding_script_runs_as_written(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(readme_python_blocks()[1])
    output = run_script([str(script)], tmp_path=tmp_path, cwd=tmp_path)
    assert output == "DURABLE ANSWERS [completed]\ncompleted 'DURABLE ANSWERS '\n"
