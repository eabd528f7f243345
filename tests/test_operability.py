"""The operator's view: /metrics scraped with Prometheus's own parser moves as a run says it
must; /readyz says when to send traffic; /healthz says nothing internal; the CLI behaves;
logs are JSON lines without secrets or prompts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anyio
import httpx
from prometheus_client.parser import text_string_to_metric_families

from web import Settings, create_app

from .conftest import ServerFactory
from .support import ROOT, read_events, start_generation

Samples = dict[str, float]


async def scrape(http: httpx.AsyncClient) -> Samples:
    """``/metrics`` parsed by prometheus-client's parser: ``name{k="v",…}`` → value."""
    response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def moved(before: Samples, after: Samples, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


async def test_metrics_count_what_a_run_did(server_factory: ServerFactory) -> None:
    server = server_factory(
        *("--sim-tokens-per-second", "400", "--sim-max-tokens", "40"),
        *("--max-body-bytes", "2000", "--shutdown-grace", "1"),
    )
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        before = await scrape(http)
        generations = [await start_generation(http, prompt=f"p{i}") for i in range(5)]
        received = 0
        for generation in generations:
            for _ in range(2):  # two readers each, from the start
                received += len(await read_events(http, generation["id"]))
        big = await http.post("/v1/generations", content=b'{"prompt": "' + b"x" * 3000 + b'"}')
        assert big.status_code == 413
        missing = await http.get("/v1/generations/gen_missing")
        assert missing.status_code == 404
        after = await scrape(http)

        completed = 'keepstream_generations_finished_total{status="completed"}'
        assert moved(before, after, completed) == 5
        assert moved(before, after, 'keepstream_sse_events_total{protocol="native"}') == received
        assert moved(before, after, "keepstream_provider_chunks_total") == 5 * 40
        assert moved(before, after, "keepstream_commits_total") >= 5
        assert moved(before, after, "keepstream_commit_seconds_count") == moved(
            before, after, "keepstream_commits_total"
        )
        written = moved(before, after, "keepstream_messages_written_total")
        assert written == moved(before, after, "keepstream_commit_batch_rows_sum")
        assert written >= received / 2  # each message was read twice
        assert moved(before, after, 'keepstream_limit_refusals_total{limit="max_body_bytes"}') == 1
        errors = 'keepstream_error_responses_total{status="404",type="not_found"}'
        assert moved(before, after, errors) == 1
        assert after['keepstream_generations{state="running"}'] == 0
        assert after["keepstream_pool_saturation"] == 0
        assert after["keepstream_wal_bytes"] > 0
        assert after['keepstream_open_readers{protocol="native"}'] == 0

        # A reader counts as open while it follows.
        slow = await start_generation(
            http, prompt="slow", params={"tokens_per_second": 5, "max_tokens": 50}
        )
        async with http.stream("GET", f"/v1/generations/{slow['id']}/events") as response:
            async for _ in response.aiter_lines():
                break
            during = await scrape(http)
            assert during['keepstream_open_readers{protocol="native"}'] == 1
            assert during['keepstream_generations{state="running"}'] == 1
        await http.post(f"/v1/generations/{slow['id']}/cancel")


async def test_healthz_is_minimal_and_readyz_checks_the_store(
    server_factory: ServerFactory,
) -> None:
    server = server_factory()
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        health = await http.get("/healthz")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        ready = await http.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"] == {
            "schema_current": True,
            "store_writable": True,
            "pool_accepting": True,
        }


async def test_readyz_is_503_while_draining(tmp_path: Path) -> None:
    """The real app and its lifespan, in-process: once the pool stops taking work (the
    server is shutting down), /readyz answers 503 so a balancer sends traffic elsewhere."""
    app = create_app(Settings(db=str(tmp_path / "k.db"), shutdown_grace=0.1))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://k") as http:
            assert (await http.get("/readyz")).status_code == 200
            await app.state.runtime.state.pool.shutdown()
            draining = await http.get("/readyz")
            assert draining.status_code == 503
            assert draining.json()["checks"]["pool_accepting"] is False
            assert (await http.get("/healthz")).status_code == 200  # still alive


def keepstream(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "web", *args], capture_output=True, text=True, cwd=ROOT, timeout=60
    )


def test_cli_help_and_version_exit_zero() -> None:
    top = keepstream("--help")
    assert top.returncode == 0 and "serve" in top.stdout
    version = keepstream("--version")
    assert version.returncode == 0 and version.stdout.startswith("keepstream ")
    serve = keepstream("serve", "--help")
    assert serve.returncode == 0
    text = " ".join(serve.stdout.split())
    assert "(default: 1048576; env KEEPSTREAM_MAX_BODY_BYTES)" in text
    assert "(default: none; env KEEPSTREAM_UPSTREAM_URL)" in text
    assert keepstream("bogus").returncode == 2
    assert keepstream().returncode == 2


async def test_logs_are_json_lines_with_ids_and_no_secrets(server_factory: ServerFactory) -> None:
    key = "sk-secret-key-0123456789"
    server = server_factory(
        *("--log-level", "info", "--api-keys", f"alice={key}"),
        *("--sim-tokens-per-second", "0", "--sim-max-tokens", "5"),
    )
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=server.url, timeout=30, headers=headers) as http:
        prompt = "a very private prompt"
        generation = await start_generation(http, prompt=prompt)
        await read_events(http, generation["id"])
    with anyio.fail_after(10):
        while f'"generation_id":"{generation["id"]}"' not in server.output():  # noqa: ASYNC110
            await anyio.sleep(0.05)
    lines = [line for line in server.output().splitlines() if line.startswith("{")]
    entries = [json.loads(line) for line in lines]
    ended = [e for e in entries if e.get("generation_id") == generation["id"]]
    assert ended[0]["user"] == "alice" and ended[0]["status"] == "completed"
    assert all({"ts", "level", "logger", "message"} <= set(e) for e in entries)
    assert key not in server.output() and prompt not in server.output()
