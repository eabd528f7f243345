"""The chat page in a real browser (issue 11): an answer streams, survives switching
sessions, a reload, going offline, a server killed and restarted, is shared by two tabs, can be
stopped, and renders 10,000 tokens without freezing; Markdown is rendered safely; with API keys
the page asks for one. Every final answer is compared with the server's snapshot, character for
character (the rule is ``browser_support.displayed``). Screenshots of the main states go to
``$KEEPSTREAM_SCREENSHOTS`` (default ``.screenshots/``, not committed)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx
import pytest

from . import browser_support
from .browser_support import (
    PACED_ARGS,
    RECONNECT_TIMEOUT,
    ChatPage,
    ContextFactory,
    assert_final_text_exact,
    displayed,
    expect,
    intermediate,
    open_chat,
    screenshot,
    snapshot,
)
from .conftest import ServerFactory
from .support import Server

# The fixtures live in browser_support; binding them here is how pytest finds them.
anyio_backend = browser_support.anyio_backend
browser = browser_support.browser
chat_server = browser_support.chat_server
new_context = browser_support.new_context

API_KEY = "sk-alice-page-0123456789"


async def start_answer(chat: ChatPage, message: str) -> str:
    """A new chat, ``message`` sent with Enter, and its answer showing its first words."""
    await chat.new_chat()
    generation_id = await chat.send(message)
    await chat.wait_busy_with_text(generation_id)
    return generation_id


async def test_an_answer_streams_into_the_page(
    new_context: ContextFactory, chat_server: Server
) -> None:
    chat = await open_chat(await new_context(), chat_server)
    await expect(chat.connection).to_have_text("Live")
    await chat.new_chat()
    current = chat.sessions.locator('[aria-current="page"]')
    await expect(current.and_(chat.session_link("New chat"))).to_have_count(1)
    message = "an answer streams"
    generation_id = await chat.send(message)
    await expect(chat.articles("You").last).to_contain_text(message)
    await chat.wait_busy_with_text(generation_id)
    await expect(chat.button("Stop")).to_be_enabled()
    await screenshot(chat.page, "mid-answer")

    final = await assert_final_text_exact(chat, chat_server, generation_id, status="completed")
    grew = intermediate(await chat.growth(generation_id), len(displayed(final["text"])))
    assert len(grew) >= 2, f"the answer did not visibly grow: {grew}"
    await chat.expect_stop_unavailable()
    # The session is renamed after its first message and marked as the current one.
    link = chat.session_link(message)
    await expect(link).to_have_attribute("aria-current", "page")
    await expect(link).to_have_attribute("href", f"#/sessions/{chat.session_id()}")
    assert (await chat.articles("Assistant").count()) == 1


async def test_switching_sessions_mid_answer_and_back(
    new_context: ContextFactory, chat_server: Server
) -> None:
    chat = await open_chat(await new_context(), chat_server)
    message = "switch away and back"
    generation_id = await start_answer(chat, message)
    first_session = chat.session_id()

    await chat.new_chat()
    await expect(chat.answer(generation_id)).to_have_count(0)
    await chat.expect_stop_unavailable()  # nothing runs in the session shown now
    await chat.forget_growth(generation_id)
    await chat.session_link(message).click()
    await expect(chat.answer(generation_id)).to_have_attribute("aria-busy", "true")
    assert chat.session_id() == first_session

    final = await assert_final_text_exact(chat, chat_server, generation_id, status="completed")
    grew = intermediate(await chat.growth(generation_id), len(displayed(final["text"])))
    assert len(grew) >= 2, f"the answer did not stream after switching back: {grew}"


async def test_reload_mid_answer_resumes(new_context: ContextFactory, chat_server: Server) -> None:
    chat = await open_chat(await new_context(), chat_server)
    await chat.new_chat()
    generation_id = await chat.send("reload mid-answer", press_enter=False)  # the Send button
    await expect(chat.composer).to_have_value("")
    await chat.wait_busy_with_text(generation_id)
    session_id = chat.session_id()

    await chat.page.reload()
    assert chat.session_id() == session_id
    await expect(chat.answer(generation_id)).to_have_attribute("aria-busy", "true")

    final = await assert_final_text_exact(chat, chat_server, generation_id, status="completed")
    grew = intermediate(await chat.growth(generation_id), len(displayed(final["text"])))
    assert len(grew) >= 2, f"the answer did not stream after the reload: {grew}"


async def test_stop_keeps_the_partial_answer_and_retry_answers_again(
    new_context: ContextFactory, chat_server: Server
) -> None:
    chat = await open_chat(await new_context(), chat_server)
    generation_id = await start_answer(chat, "stop it")
    await expect(chat.button("Stop")).to_be_enabled()
    await chat.button("Stop").click()

    final = await assert_final_text_exact(chat, chat_server, generation_id, status="cancelled")
    assert len(final["text"].split()) < 60, "the answer ran to its end"
    assert "Stopped" in await chat.state_text(generation_id)
    await chat.expect_stop_unavailable()
    await screenshot(chat.page, "stopped")

    # Retry replaces the stopped answer with a new one, which streams and ends exact.
    await chat.button("Retry").click()
    again = await chat.wait_new_answer([generation_id])
    await assert_final_text_exact(chat, chat_server, again, status="completed")
    await expect(chat.answer(generation_id)).to_have_count(0)
    assert (await chat.articles("Assistant").count()) == 1


async def test_two_tabs_on_one_session_see_the_same_answer(
    new_context: ContextFactory, chat_server: Server
) -> None:
    context = await new_context()
    first = await open_chat(context, chat_server)
    generation_id = await start_answer(first, "two tabs")
    second = await open_chat(context, chat_server, first.session_id())
    await expect(second.answer(generation_id)).to_have_attribute("aria-busy", "true")

    final = await assert_final_text_exact(first, chat_server, generation_id, status="completed")
    await assert_final_text_exact(second, chat_server, generation_id, status="completed")
    assert await second.body_text(generation_id) == displayed(final["text"])


async def test_offline_then_online_resumes(
    new_context: ContextFactory, chat_server: Server
) -> None:
    context = await new_context()
    chat = await open_chat(context, chat_server)
    generation_id = await start_answer(chat, "offline then online")

    await context.set_offline(True)
    await expect(chat.connection).to_have_text("Offline")
    await chat.expect_plain_words_alert()
    assert await chat.is_busy(generation_id), "the answer ended while the page was offline"
    await screenshot(chat.page, "offline")
    await context.set_offline(False)

    await assert_final_text_exact(chat, chat_server, generation_id, status="completed")
    await expect(chat.connection).to_have_text("Live")
    await expect(chat.alert).to_have_text("")


async def test_server_killed_and_restarted_mid_answer(
    new_context: ContextFactory, server_factory: ServerFactory
) -> None:
    # A killed server's answer goes on when the server comes back: the restarted server
    # continues it from its committed text, and the page shows it to the end.
    args = PACED_ARGS
    server = server_factory(*args)
    chat = await open_chat(await new_context(), server)
    generation_id = await start_answer(chat, "the server dies")

    server.kill()
    await expect(chat.connection).to_have_text("Reconnecting…")
    await chat.expect_plain_words_alert()
    assert await chat.is_busy(generation_id)
    await screenshot(chat.page, "reconnecting")

    restarted = server_factory(*args, db=server.db, port=server.port)
    await chat.wait_final(generation_id, timeout=RECONNECT_TIMEOUT)
    await assert_final_text_exact(chat, restarted, generation_id, status="completed")
    assert "Interrupted" not in await chat.state_text(generation_id)
    await expect(chat.connection).to_have_text("Live")
    await expect(chat.alert).to_have_text("")  # the outage is over: no stale error
    await screenshot(chat.page, "after-restart")

    # The restarted server takes new messages from the same page.
    again = await chat.send("after the restart")
    await assert_final_text_exact(chat, restarted, again, status="completed")


async def test_with_api_keys_the_page_asks_for_a_key(
    new_context: ContextFactory, server_factory: ServerFactory
) -> None:
    server = server_factory(*PACED_ARGS, "--api-keys", f"alice={API_KEY}")
    context = await new_context()
    page = await context.new_page()
    chat = ChatPage(page, server.url)
    await page.goto(server.url + "/")
    key_box = page.get_by_role("textbox", name="API key", exact=True)
    await expect(key_box).to_be_visible()
    await expect(key_box).to_have_attribute("type", "password")
    await screenshot(page, "api-key")

    await key_box.fill(API_KEY)
    await chat.button("Save key").click()
    await chat.composer.wait_for(state="visible")
    stored = await page.evaluate("() => localStorage.getItem('keepstream.apiKey')")
    assert stored == API_KEY

    generation_id = await start_answer(chat, "with a key")
    await assert_final_text_exact(chat, server, generation_id, status="completed", api_key=API_KEY)

    # The key is kept: a reload goes straight to the conversation.
    await page.reload()
    await expect(chat.answer(generation_id)).to_be_visible()
    assert await chat.body_text(generation_id) == displayed(
        (await snapshot(server, generation_id, api_key=API_KEY))["text"]
    )


async def test_an_unknown_session_is_an_error_in_plain_words(
    new_context: ContextFactory, chat_server: Server
) -> None:
    context = await new_context()
    page = await context.new_page()
    chat = ChatPage(page, chat_server.url)
    await page.goto(f"{chat_server.url}/#/sessions/ses_no_such_session")
    await chat.expect_plain_words_alert()
    await screenshot(page, "unknown-session")


HOSTILE: Sequence[tuple[str, str, str]] = (
    ("img-onerror", "<img src=x onerror=alert(1)>", "<img src=x onerror=alert(1)>"),
    ("script", "before <script>alert(1)</script> after", "<script>alert(1)</script>"),
    ("javascript-link", "[x](javascript:alert(1))", "javascript:alert(1)"),
    (
        "html-in-code-fence",
        "```html\n<img src=x onerror=alert(1)><script>alert(2)</script>\n```",
        "<img src=x onerror=alert(1)><script>alert(2)</script>",
    ),
    ("inline-code", "`<b onmouseover=alert(1)>x</b>`", "<b onmouseover=alert(1)>x</b>"),
    ("iframe", '<iframe src="javascript:alert(1)"></iframe>', "<iframe"),
    ("svg", "<svg><script>alert(1)</script></svg>", "<svg>"),
    ("autolink", "<javascript:alert(1)>", "alert(1)"),
    ("data-link", "[d](data:text/html,<script>alert(1)</script>)", "alert(1)"),
)

RENDER = """
async (cases) => {
  const { renderMarkdown } = await import("/static/markdown.js");
  const alerts = [];
  window.alert = (message) => alerts.push(String(message));
  const results = [];
  for (const [, input] of cases) {
    const fragment = renderMarkdown(input);
    const holder = document.createElement("div");
    holder.append(fragment);
    document.body.append(holder);  // attached, so anything that could run would run
    const elements = [...holder.querySelectorAll("*")];
    results.push({
      isFragment: fragment instanceof DocumentFragment,
      tags: [...new Set(elements.map((e) => e.localName))].sort(),
      handlers: elements.flatMap((e) =>
        [...e.attributes].map((a) => a.name).filter((n) => n.startsWith("on"))),
      hrefs: [...holder.querySelectorAll("[href],[src],[action],[formaction]")].map(
        (e) => e.getAttribute("href") ?? e.getAttribute("src") ?? e.getAttribute("action")
          ?? e.getAttribute("formaction")),
      text: holder.textContent,
    });
    holder.remove();
  }
  await new Promise((resolve) => setTimeout(resolve, 100));  // an onerror would have fired
  return { results, alerts };
}
"""
# Elements a Markdown renderer may create; nothing from the input's HTML may appear.
MARKDOWN_TAGS = {
    "p", "br", "hr", "em", "strong", "del", "code", "pre", "a", "ul", "ol", "li", "blockquote",
    "h1", "h2", "h3", "h4", "h5", "h6", "span", "table", "thead", "tbody", "tr", "th", "td",
}  # fmt: skip


async def test_markdown_is_rendered_safely(
    new_context: ContextFactory, chat_server: Server
) -> None:
    chat = await open_chat(await new_context(), chat_server)
    outcome: dict[str, Any] = await chat.page.evaluate(RENDER, [list(case) for case in HOSTILE])
    assert outcome["alerts"] == []
    for (name, _, literal), result in zip(HOSTILE, outcome["results"], strict=True):
        assert result["isFragment"], name
        assert set(result["tags"]) <= MARKDOWN_TAGS, (name, result["tags"])
        assert result["handlers"] == [], (name, result)
        for url in result["hrefs"]:
            assert not url.strip().lower().startswith(("javascript:", "data:", "vbscript:")), (
                name,
                url,
            )
        assert literal in result["text"], (name, result["text"])
    # Markdown itself still works: emphasis and code become elements, their text literal.
    shown: dict[str, Any] = await chat.page.evaluate(
        """async () => {
          const { renderMarkdown } = await import("/static/markdown.js");
          const holder = document.createElement("div");
          holder.append(renderMarkdown("**bold** and `a < b`"));
          return { strong: holder.querySelector("strong")?.textContent,
                   code: holder.querySelector("code")?.textContent };
        }"""
    )
    assert shown == {"strong": "bold", "code": "a < b"}


async def test_a_10000_token_answer_renders_incrementally(
    new_context: ContextFactory, server_factory: ServerFactory
) -> None:
    server = server_factory(
        "--sim-tokens-per-second", "2500", "--sim-max-tokens", "10000", "--shutdown-grace", "1"
    )
    chat = await open_chat(await new_context(), server)
    await chat.new_chat()
    await chat.page.evaluate("() => window.__keepstreamProbe.resetGap()")
    generation_id = await chat.send("a long answer")
    await chat.wait_busy_with_text(generation_id)

    # The page takes typing while the answer streams into it.
    typed = "typing while it streams"
    await chat.composer.press_sequentially(typed, delay=10)
    await expect(chat.composer).to_have_value(typed)
    assert await chat.is_busy(generation_id), "the answer ended before the typing did"

    final = await assert_final_text_exact(chat, server, generation_id, status="completed")
    assert len(final["text"].split(" ")) == 10_001  # 10,000 words and the trailing space
    grew = intermediate(await chat.growth(generation_id), len(displayed(final["text"])))
    assert len(grew) >= 5, f"the answer was not rendered incrementally: {grew}"
    longest_gap = await chat.page.evaluate("() => window.__keepstreamProbe.longestGap()")
    assert longest_gap < 1000, f"the page froze for {longest_gap:.0f} ms"


# autouse: made when the module's first test starts, so its answers (6 s) run meanwhile.
@pytest.fixture(scope="module", autouse=True)
def finished_conversation(chat_server: Server) -> tuple[str, list[str]]:
    """A session with two questions and their answers, made through the API: its id and the
    answers' generation ids."""
    with httpx.Client(base_url=chat_server.url, timeout=10) as http:
        created = http.post(
            "/v1/sessions", json={"title": "Durable answers, explained", "on_busy": "queue"}
        )
        assert created.status_code == 201, created.text
        session_id: str = created.json()["id"]
        generation_ids = []
        for content in ("What does keepstream keep?", "And when the server restarts?"):
            posted = http.post(f"/v1/sessions/{session_id}/messages", json={"content": content})
            assert posted.status_code == 202, posted.text
            generation_ids.append(posted.json()["generation_id"])
    return session_id, generation_ids


LUMINANCE = """
(selector) => {
  // The first opaque background behind the element, as relative luminance (0 black, 1 white).
  for (let e = document.querySelector(selector); e; e = e.parentElement) {
    const [r, g, b, a = 1] = getComputedStyle(e).backgroundColor.match(/[\\d.]+/g).map(Number);
    if (a === 0) continue;
    const lin = (c) => ((c /= 255) <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4);
    return 0.2126 * lin(r) + 0.7152 * lin(g) + 0.0722 * lin(b);
  }
  return 1;  // nothing opaque: the canvas is white
}
"""


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("light", {"color_scheme": "light"}),
        ("dark", {"color_scheme": "dark"}),
        ("narrow", {"viewport": {"width": 375, "height": 812}, "is_mobile": True}),
    ],
    ids=["light", "dark", "narrow"],
)
async def test_screenshots_of_a_finished_conversation(
    new_context: ContextFactory,
    chat_server: Server,
    finished_conversation: tuple[str, list[str]],
    name: str,
    options: dict[str, Any],
) -> None:
    session_id, generation_ids = finished_conversation
    chat = await open_chat(await new_context(**options), chat_server, session_id)
    for generation_id in generation_ids:
        await assert_final_text_exact(chat, chat_server, generation_id, status="completed")
    await expect(chat.connection).to_have_text("Live")
    await expect(chat.articles("You")).to_have_count(2)
    await screenshot(chat.page, name)

    background = await chat.page.evaluate(LUMINANCE, ".message-body")
    if name == "dark":
        assert background < 0.2, f"the dark scheme's background is light ({background:.2f})"
    else:
        assert background > 0.6, f"the light scheme's background is dark ({background:.2f})"
    if name == "narrow":  # usable at phone width: nothing scrolls sideways
        width = await chat.page.evaluate("() => document.documentElement.scrollWidth")
        assert width <= 375
