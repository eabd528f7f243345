"""Browser tests of the chat page: Debian's Chromium driven by Playwright's async API.

The fixtures are module-scoped where they cost seconds (the browser, the shared server) and
function-scoped where a test must start clean (a browser context: its own storage, network
state and pages). A test module binds them by name (``browser = browser_support.browser``).

Without the ``playwright`` package or a ``chromium`` binary the tests are skipped on a
developer's machine and fail in CI (``CI`` set). Playwright's own browser downloads are never
used: the browser is the system's, through ``executable_path``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from .support import ROOT, Server, get_snapshot

if importlib.util.find_spec("playwright") is None:  # pragma: no cover - depends on the machine
    if os.environ.get("CI"):
        pytest.fail("the playwright package is needed for the browser tests", pytrace=False)
    pytest.skip("the playwright package is not installed", allow_module_level=True)

# Imported only once it is known to be installed; test modules take `expect` from here too.
from playwright.async_api import (
    Browser,
    BrowserContext,
    Locator,
    Page,
    async_playwright,
)
from playwright.async_api import expect as expect

CHROMIUM_ARGS: Sequence[str] = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
)
# Every Playwright action and wait gives up after this long (milliseconds).
ACTION_TIMEOUT_MS = 10_000
# Playwright's assertions (`expect`) wait as long as its actions, not their default 5 s.
expect.set_options(timeout=ACTION_TIMEOUT_MS)
# An answer of the paced simulated model ends well within this (seconds).
ANSWER_TIMEOUT = 30.0
# The page's reconnect backoff must bring it back within this after the server is (seconds).
RECONNECT_TIMEOUT = 30.0

# The shared server's simulated model: 60 tokens at 20 a second, so an answer takes about 3 s
# and every scenario that acts "mid-answer" has time to act. Sessions: every test opens a few.
PACED_ARGS: Sequence[str] = (
    "--sim-tokens-per-second",
    "20",
    "--sim-max-tokens",
    "60",
    "--shutdown-grace",
    "1",
    "--max-sessions-per-user",
    "200",
)

# Installed in every page before its own scripts. It records, per generation id, each distinct
# length the answer's `.message-body` text had while its article was `aria-busy="true"` (so a
# test can tell an answer grew in steps, wherever the page re-creates its DOM), and the longest
# gap between ticks of a 20 ms interval timer (how long the main thread was blocked).
PAGE_PROBE = """
(() => {
  const growth = new Map();
  const sample = () => {
    for (const article of document.querySelectorAll("article[data-generation-id]")) {
      if (article.getAttribute("aria-busy") !== "true") continue;
      const id = article.getAttribute("data-generation-id");
      const body = article.querySelector(".message-body");
      const length = body ? body.textContent.length : 0;
      let lengths = growth.get(id);
      if (!lengths) growth.set(id, (lengths = []));
      if (lengths[lengths.length - 1] !== length) lengths.push(length);
    }
  };
  new MutationObserver(sample).observe(document, {
    subtree: true, childList: true, characterData: true, attributes: true,
  });
  let last = performance.now();
  let longestGap = 0;
  setInterval(() => {
    const now = performance.now();
    longestGap = Math.max(longestGap, now - last);
    last = now;
  }, 20);
  Object.defineProperty(window, "__keepstreamProbe", {
    value: Object.freeze({
      growth: (id) => [...(growth.get(id) ?? [])],
      forget: (id) => growth.delete(id),
      longestGap: () => longestGap,
      resetGap: () => { longestGap = 0; last = performance.now(); },
    }),
  });
})();
"""

SESSION_HASH = re.compile(r"#/sessions/([^/?#]+)$")


def chromium_path() -> str:
    """Debian's Chromium, or skip (fail in CI) when it is not installed."""
    found = shutil.which("chromium") or (
        "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
    )
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is needed for the browser tests (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found


def screenshot_dir() -> Path:
    """Where the tests write screenshots: ``$KEEPSTREAM_SCREENSHOTS``, else ``.screenshots/``
    in the repository (ignored by git)."""
    folder = Path(os.environ.get("KEEPSTREAM_SCREENSHOTS") or ROOT / ".screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


async def screenshot(page: Page, name: str) -> Path:
    """Save the whole page as ``<name>.png`` in ``screenshot_dir()``."""
    path = screenshot_dir() / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True, animations="disabled")
    return path


def displayed(text: str) -> str:
    """What the page must show in an answer's ``.message-body`` for the stored ``text``.

    The rule, strict on purpose: the ``textContent`` of ``.message-body`` is the stored text
    itself, character for character, trailing space included. ``markdown.js`` promises it:
    it keeps the text between blocks as text nodes, so a rendered answer's ``textContent`` is
    its source wherever no Markdown syntax was used, and the simulated model writes none (words
    of its vocabulary, multi-byte and combining ones included, each followed by one space).
    """
    return text


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """Module-scoped, so the module's async fixtures (the browser) share one event loop."""
    return "asyncio"


@pytest.fixture(scope="module")
async def browser(anyio_backend: str) -> AsyncIterator[Browser]:
    """Headless Chromium for the whole module."""
    executable = chromium_path()
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=executable, headless=True, args=list(CHROMIUM_ARGS)
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One paced server (answers take about 3 s) for the scenarios that can share one."""
    server = Server(db=tmp_path_factory.mktemp("chat") / "keepstream.db", args=PACED_ARGS)
    try:
        yield server.start()
    finally:
        server.kill()


ContextFactory = Callable[..., Awaitable[BrowserContext]]


@dataclass
class PageErrors:
    """Uncaught exceptions thrown in any page of a test's contexts."""

    errors: list[str] = field(default_factory=list)

    def watch(self, context: BrowserContext) -> None:
        context.on("page", lambda page: page.on("pageerror", self._record))
        for page in context.pages:
            page.on("pageerror", self._record)

    def _record(self, error: Exception) -> None:
        self.errors.append(str(error))


@pytest.fixture
async def new_context(browser: Browser) -> AsyncIterator[ContextFactory]:
    """Make browser contexts (``color_scheme=``, ``viewport=``, … as Playwright takes them),
    each with the page probe installed; all are closed afterwards. The test fails if any page
    threw an uncaught exception."""
    contexts: list[BrowserContext] = []
    errors = PageErrors()

    async def make(**options: Any) -> BrowserContext:
        context = await browser.new_context(**options)
        context.set_default_timeout(ACTION_TIMEOUT_MS)
        await context.add_init_script(PAGE_PROBE)
        errors.watch(context)
        contexts.append(context)
        return context

    yield make
    for context in contexts:
        await context.close()
    assert not errors.errors, f"uncaught errors in the page: {errors.errors}"


# -- driving the page --------------------------------------------------------------------------


@dataclass
class ChatPage:
    """The chat page as a person uses it, through the names and roles of its contract."""

    page: Page
    server_url: str

    @property
    def composer(self) -> Locator:
        return self.page.get_by_role("textbox", name="Message", exact=True)

    @property
    def sessions(self) -> Locator:
        return self.page.get_by_role("navigation", name="Sessions", exact=True)

    @property
    def connection(self) -> Locator:
        return self.page.get_by_role("status", name="Connection", exact=True)

    @property
    def alert(self) -> Locator:
        return self.page.get_by_role("alert")

    def button(self, name: str) -> Locator:
        return self.page.get_by_role("button", name=name, exact=True)

    async def expect_stop_unavailable(self) -> None:
        """ "Stop" is disabled (whether the page also hides it or not): nothing runs."""
        stop = self.page.get_by_role("button", name="Stop", exact=True, include_hidden=True)
        await expect(stop).to_be_disabled()

    async def expect_plain_words_alert(self) -> None:
        """The alert says what is wrong in a sentence: not empty, no JSON, no stack trace."""
        await expect(self.alert).not_to_have_text("")
        text = await self.alert.text_content() or ""
        assert re.fullmatch(r"[^{}<>]*[A-Za-z]{3,}[^{}<>]*", text.strip()), text
        assert "Error:" not in text and "undefined" not in text, text

    def session_link(self, title: str) -> Locator:
        return self.sessions.get_by_role("link", name=title, exact=True)

    def answer(self, generation_id: str) -> Locator:
        """The assistant article of ``generation_id``."""
        return self.page.locator(f'article[data-generation-id="{generation_id}"]')

    def articles(self, who: str) -> Locator:
        """Every message article whose accessible name starts with ``who`` ("You", …)."""
        return self.page.get_by_role("article", name=re.compile(f"^{who}"))

    async def open(self, session_id: str | None = None) -> ChatPage:
        """Load the page (on ``#/sessions/<id>`` if given) and wait for its composer."""
        fragment = f"#/sessions/{session_id}" if session_id else ""
        await self.page.goto(f"{self.server_url}/{fragment}")
        await self.composer.wait_for(state="visible")
        return self

    def session_id(self) -> str:
        """The session the page shows, from its URL."""
        match = SESSION_HASH.search(self.page.url)
        assert match, f"no session in the page's URL: {self.page.url}"
        return match.group(1)

    async def new_chat(self) -> str:
        """Press "New chat" and wait until the page shows an empty new session; its id."""
        before = SESSION_HASH.search(self.page.url)
        await self.button("New chat").click()
        await self.page.wait_for_function(
            """(before) => {
              const match = location.hash.match(/^#\\/sessions\\/([^/?#]+)$/);
              return match !== null && match[1] !== before
                && document.querySelectorAll("article").length === 0;
            }""",
            arg=before.group(1) if before else None,
        )
        return self.session_id()

    async def generation_ids(self) -> list[str]:
        ids: list[str] = await self.page.locator("article[data-generation-id]").evaluate_all(
            "(articles) => articles.map((a) => a.getAttribute('data-generation-id'))"
        )
        return ids

    async def send(self, text: str, *, press_enter: bool = True) -> str:
        """Type ``text`` in the composer and send it (Enter, or the Send button); wait for the
        answer's article and return its generation id."""
        known = await self.generation_ids()
        await self.composer.fill(text)
        if press_enter:
            await self.composer.press("Enter")
        else:
            await self.button("Send").click()
        return await self.wait_new_answer(known)

    async def wait_new_answer(self, known: Sequence[str]) -> str:
        """Wait for an assistant article whose generation is not in ``known``; its id."""
        handle = await self.page.wait_for_function(
            """(known) => {
              for (const a of document.querySelectorAll("article[data-generation-id]")) {
                const id = a.getAttribute("data-generation-id");
                if (id && !known.includes(id)) return id;
              }
              return null;
            }""",
            arg=list(known),
        )
        generation_id = await handle.json_value()
        assert isinstance(generation_id, str)
        return generation_id

    async def wait_busy_with_text(self, generation_id: str) -> int:
        """Wait until the answer is generating and shows some text; that text's length."""
        handle = await self.page.wait_for_function(
            """(id) => {
              const a = document.querySelector(`article[data-generation-id="${id}"]`);
              if (!a || a.getAttribute("aria-busy") !== "true") return null;
              const body = a.querySelector(".message-body");
              const n = body ? body.textContent.length : 0;
              return n > 0 ? n : null;
            }""",
            arg=generation_id,
        )
        length = await handle.json_value()
        assert isinstance(length, int)
        return length

    async def is_busy(self, generation_id: str) -> bool:
        return await self.answer(generation_id).get_attribute("aria-busy") == "true"

    async def wait_final(self, generation_id: str, timeout: float = ANSWER_TIMEOUT) -> None:
        """Wait until the answer's article is final (``aria-busy`` absent or not "true")."""
        await self.page.wait_for_function(
            """(id) => {
              const a = document.querySelector(`article[data-generation-id="${id}"]`);
              return a !== null && a.getAttribute("aria-busy") !== "true";
            }""",
            arg=generation_id,
            timeout=timeout * 1000,
        )

    async def body_text(self, generation_id: str) -> str:
        """The answer's rendered text: the ``textContent`` of its ``.message-body``."""
        text = await self.answer(generation_id).locator(".message-body").text_content()
        assert text is not None
        return text

    async def state_text(self, generation_id: str) -> str:
        """The answer's article text outside ``.message-body``: its name, its final state."""
        text: str = await self.answer(generation_id).evaluate(
            """(article) => {
              const copy = article.cloneNode(true);
              copy.querySelectorAll(".message-body").forEach((body) => body.remove());
              return copy.textContent.replace(/\\s+/g, " ").trim();
            }"""
        )
        return text

    async def growth(self, generation_id: str) -> list[int]:
        """The distinct lengths the answer's text had while it was generating, in order."""
        lengths: list[int] = await self.page.evaluate(
            "(id) => window.__keepstreamProbe.growth(id)", generation_id
        )
        return lengths

    async def forget_growth(self, generation_id: str) -> None:
        await self.page.evaluate("(id) => window.__keepstreamProbe.forget(id)", generation_id)


async def open_chat(
    context: BrowserContext, server: Server, session_id: str | None = None
) -> ChatPage:
    """A new page of ``context`` showing the chat page of ``server``."""
    return await ChatPage(await context.new_page(), server.url).open(session_id)


async def snapshot(
    server: Server, generation_id: str, *, api_key: str | None = None
) -> dict[str, Any]:
    """The server's ``GET /v1/generations/{id}``."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=10) as http:
        return await get_snapshot(http, generation_id)


async def assert_final_text_exact(
    chat: ChatPage,
    server: Server,
    generation_id: str,
    *,
    status: str,
    api_key: str | None = None,
) -> dict[str, Any]:
    """The answer is final on the page, the server's snapshot has ``status``, and the page
    shows the snapshot's text character for character (see ``displayed``). The snapshot."""
    await chat.wait_final(generation_id)
    final = await snapshot(server, generation_id, api_key=api_key)
    assert final["status"] == status, f"the server says {final['status']}, not {status}: {final}"
    assert final["text"], "the answer has no text to compare"
    shown = await chat.body_text(generation_id)
    expected = displayed(final["text"])
    assert shown == expected, f"the page shows {shown!r}, the server has {expected!r}"
    return final


def intermediate(lengths: Sequence[int], final_length: int) -> list[int]:
    """The lengths strictly between nothing and the final text."""
    return sorted({n for n in lengths if 0 < n < final_length})
