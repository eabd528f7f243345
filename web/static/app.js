// The chat page: sessions in a sidebar, one conversation, a composer. Every answer is shown
// through keepstream.js's openAnswer (snapshot, then follow from next_offset, resuming by
// itself), so switching chats, reloading, going offline or a server restart loses nothing.

import { Keepstream, KeepstreamError, isTerminal, openAnswer } from "./keepstream.js";
import { MarkdownView } from "./markdown.js";

const KEY_STORAGE = "keepstream.apiKey";
const NEW_TITLE = "New chat";
const TITLE_CHARS = 40;
const REFRESH_EVERY = 3000; // ms between sidebar refreshes
const REFRESH_BACKOFF_MAX = 8000;
const SEND_ATTEMPTS = 4; // a send is retried (same Idempotency-Key) on network errors and 5xx
const MOBILE = window.matchMedia("(max-width: 760px)");

const $ = (id) => document.getElementById(id);
const ui = {
  app: $("app"),
  sidebar: $("sidebar"),
  scrim: $("scrim"),
  sessionList: $("session-list"),
  sessionsEmpty: $("sessions-empty"),
  toggle: $("sessions-toggle"),
  closeSidebar: $("close-sidebar"),
  newChat: [$("new-chat-side"), $("new-chat-top")],
  forgetKey: $("forget-key"),
  title: $("chat-title"),
  badge: $("chat-badge"),
  renameForm: $("rename-form"),
  renameInput: $("rename-input"),
  renameCancel: $("rename-cancel"),
  actions: $("chat-actions"),
  rename: $("rename"),
  toggleClosed: $("toggle-closed"),
  toggleClosedLabel: $("toggle-closed-label"),
  remove: $("delete"),
  connection: $("connection"),
  alertBar: $("alert-bar"),
  alert: $("alert"),
  alertDismiss: $("alert-dismiss"),
  scroller: $("scroller"),
  welcome: $("welcome"),
  suggestions: $("suggestions"),
  messages: $("messages"),
  composer: $("composer"),
  input: $("message"),
  send: $("send"),
  stop: $("stop"),
  keyDialog: $("key-dialog"),
  keyForm: $("key-form"),
  keyInput: $("api-key"),
  keyError: $("key-error"),
};

// -- the API ----------------------------------------------------------------------------------

const ks = new Keepstream({ baseUrl: new URL(".", location.href).href, apiKey: loadKey() });

function loadKey() {
  try {
    return localStorage.getItem(KEY_STORAGE);
  } catch {
    return null;
  }
}

function saveKey(key) {
  try {
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
  } catch {
    // Storage may be refused (private mode): the key then lasts as long as the page.
  }
  ks.apiKey = key || null;
  ui.forgetKey.hidden = !ks.apiKey;
}

/** A request whose outcome also tells the connection indicator how the server is doing. */
async function api(method, path, body, options = {}) {
  try {
    const answer = await ks.request(method, path, body, options);
    connection.requestFailed = false;
    updateConnection();
    return answer;
  } catch (error) {
    if (error instanceof KeepstreamError) {
      connection.requestFailed = error.retryable;
      if (error.status === 401) askForKey();
      updateConnection();
    }
    throw error;
  }
}

const sessionPath = (id) => `/v1/sessions/${encodeURIComponent(id)}`;

function newKey() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// -- plain-words errors -----------------------------------------------------------------------

function describe(error, about = "chat") {
  if (!(error instanceof KeepstreamError)) return "Something went wrong in the page. Reload it to go on.";
  if (error.status === 0) return "The server did not answer. Check that keepstream is running.";
  if (error.status === 401) return "This server needs an API key.";
  if (error.status === 404) return about === "answer" ? "That answer was not found; it may have been deleted." : "That chat was not found; it may have been deleted.";
  if (error.type === "session_busy") return "An answer is still being written in this chat. Wait for it, or stop it, then send again.";
  if (error.type === "session_closed") return "This chat is closed. Reopen it to write in it.";
  if (error.status === 413) return `That is too much for this server: ${error.message}`;
  if (error.status === 429) return "The server is busy right now. Try again in a moment.";
  if (error.status >= 500) return `The server had a problem (${error.status}). Try again in a moment.`;
  if (error.type === "limit_exceeded") return `A limit of this server was reached: ${error.message}`;
  return `The server refused that: ${error.message}`;
}

let actionError = "";

function showError(message) {
  actionError = message;
  renderAlert();
}

function clearError() {
  if (!actionError) return;
  actionError = "";
  renderAlert();
}

function renderAlert() {
  const text = actionError || connection.message || "";
  if (ui.alert.textContent !== text) ui.alert.textContent = text;
  // The alert region stays in the page (empty when all is well), so screen readers announce
  // what appears in it.
  if (text) delete ui.alertBar.dataset.empty;
  else ui.alertBar.dataset.empty = "true";
  ui.alertBar.dataset.kind = actionError ? "error" : "connection";
  ui.alertDismiss.hidden = !actionError;
}

// -- connection state -------------------------------------------------------------------------

const connection = {
  follow: "live", // the current answer's follow: live, reconnecting or offline
  followMessage: "",
  requestFailed: false,
  refreshMessage: "",
  get message() {
    if (!navigator.onLine) return "You are offline. The answer goes on and will be back when you are.";
    return this.followMessage || this.refreshMessage;
  },
};

function updateConnection() {
  let state = "live";
  if (!navigator.onLine || connection.follow === "offline") state = "offline";
  else if (connection.follow === "reconnecting" || connection.requestFailed) state = "reconnecting";
  const text = { live: "Live", reconnecting: "Reconnecting…", offline: "Offline" }[state];
  if (ui.connection.textContent !== text) ui.connection.textContent = text;
  ui.connection.dataset.state = state;
  renderAlert();
}

function retryingIn(ms) {
  return `The server did not answer. Retrying in ${Math.max(1, Math.round(ms / 1000))} s.`;
}

// -- rendering in animation frames ------------------------------------------------------------

const dirty = new Set();
let frame = 0;
let frameTimer = 0;

function scheduleFlush(view) {
  dirty.add(view);
  if (frame) return;
  frame = requestAnimationFrame(flushAll);
  // Background tabs get no animation frames: a timer keeps their text moving too.
  frameTimer = setTimeout(flushAll, 250);
}

function flushAll() {
  cancelAnimationFrame(frame);
  clearTimeout(frameTimer);
  frame = 0;
  const stick = nearBottom();
  for (const view of dirty) view.flush();
  dirty.clear();
  if (stick) scrollToBottom();
}

function nearBottom() {
  const s = ui.scroller;
  return s.scrollHeight - s.scrollTop - s.clientHeight < 120;
}

function scrollToBottom() {
  ui.scroller.scrollTop = ui.scroller.scrollHeight;
}

// -- one message ------------------------------------------------------------------------------

let articleCount = 0;

/** One message's article; assistant ones can stream. */
class MessageView {
  constructor(message) {
    this.id = message.id;
    this.role = message.role === "user" ? "user" : "assistant";
    this.generationId = message.generation_id ?? null;
    this.status = message.generation_status ?? null;
    this.following = false;
    this.final = false;
    this.pending = "";

    const headId = `message-head-${++articleCount}`;
    this.el = document.createElement("article");
    this.el.className = `message ${this.role}`;
    this.el.setAttribute("aria-labelledby", headId);
    if (this.generationId) this.el.dataset.generationId = this.generationId;

    const head = document.createElement("div");
    head.className = "message-head";
    const avatar = document.createElement("span");
    avatar.className = "avatar";
    avatar.setAttribute("aria-hidden", "true");
    avatar.textContent = this.role === "user" ? "Y" : "";
    const name = document.createElement("span");
    name.className = "message-author";
    name.id = headId;
    name.textContent = this.role === "user" ? "You" : "Assistant";
    head.append(avatar, name);

    this.body = document.createElement("div");
    this.body.className = "message-body";
    this.markdown = new MarkdownView(this.body);

    this.el.append(head, this.body);
    if (this.role === "user") {
      this.body.textContent = message.content ?? "";
      return;
    }
    this.typing = document.createElement("div");
    this.typing.className = "typing";
    this.typing.setAttribute("aria-hidden", "true");
    this.typing.append(...[0, 1, 2].map(() => document.createElement("span")));
    this.stateLine = document.createElement("p");
    this.stateLine.className = "message-state";
    this.stateLine.hidden = true;
    this.tools = document.createElement("div");
    this.tools.className = "message-tools";
    this.copyButton = toolButton("i-copy", "Copy");
    this.copyButton.addEventListener("click", () => this.copy());
    this.retryButton = toolButton("i-retry", "Retry");
    this.retryButton.hidden = true;
    this.retryButton.addEventListener("click", () => retryAnswer());
    this.tools.append(this.copyButton, this.retryButton);
    this.tools.hidden = true;
    this.el.append(this.typing, this.stateLine, this.tools);
    this.markdown.set(message.content ?? "");
    this.setBusy(!isTerminal(this.status));
  }

  setBusy(busy) {
    this.el.setAttribute("aria-busy", busy ? "true" : "false");
    this.el.classList.toggle("streaming", busy);
    this.typing.hidden = !busy || this.markdown.source.length > 0;
    this.tools.hidden = busy;
  }

  /** The snapshot's text: what the answer says so far. */
  setText(text) {
    this.pending = "";
    dirty.delete(this);
    if (text !== this.markdown.source) this.markdown.set(text);
    this.typing.hidden = !!text || this.final;
  }

  push(text) {
    this.pending += text;
    scheduleFlush(this);
  }

  flush() {
    if (!this.pending) return;
    this.markdown.append(this.pending);
    this.pending = "";
    this.typing.hidden = true;
  }

  /** The final state: text first, then the busy flag, then the words for how it ended. */
  finish(status, error, text) {
    this.flush();
    dirty.delete(this);
    if (text !== undefined && text !== this.markdown.source) this.markdown.set(text);
    this.status = status;
    this.final = true;
    this.following = false;
    this.setBusy(false);
    const words = endedWords(status, error);
    this.stateLine.textContent = words;
    this.stateLine.hidden = !words;
    this.stateLine.dataset.status = status;
    this.el.dataset.status = status;
  }

  async copy() {
    try {
      await navigator.clipboard.writeText(this.markdown.source);
      this.copyButton.dataset.done = "true";
      setTimeout(() => delete this.copyButton.dataset.done, 1500);
    } catch {
      showError("The browser did not allow copying.");
    }
  }
}

function toolButton(icon, label) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "tool-button";
  button.append(svgIcon(icon));
  const text = document.createElement("span");
  text.textContent = label;
  button.append(text);
  return button;
}

function svgIcon(name) {
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("aria-hidden", "true");
  const use = document.createElementNS("http://www.w3.org/2000/svg", "use");
  use.setAttribute("href", `#${name}`);
  svg.append(use);
  return svg;
}

function endedWords(status, error) {
  if (status === "cancelled") return "Stopped";
  if (status === "interrupted") return "Interrupted — the server restarted";
  if (status === "failed") {
    const message = error?.message ? String(error.message) : "the model could not answer";
    return `Failed: ${message}`;
  }
  return "";
}

// -- the open conversation --------------------------------------------------------------------

/** The conversation on screen; replaced (and its follows stopped) when another one opens. */
let view = null;

class ConversationView {
  constructor(id) {
    this.id = id;
    this.session = null;
    this.messages = new Map(); // message id -> MessageView
    this.controller = new AbortController();
    this.reloads = 0;
    this.rendered = 0;
    this.pendingUser = null;
  }

  get signal() {
    return this.controller.signal;
  }

  close() {
    this.controller.abort();
    for (const message of this.messages.values()) dirty.delete(message);
  }

  /** The assistant message whose answer is still queued or running, if any. */
  get running() {
    for (const message of this.messages.values()) {
      if (message.role === "assistant" && !message.final && !isTerminal(message.status)) return message;
    }
    return null;
  }

  get lastAssistant() {
    let last = null;
    for (const message of this.messages.values()) if (message.role === "assistant") last = message;
    return last;
  }
}

async function openConversation(id) {
  if (view?.id === id && id !== null) return;
  view?.close();
  connection.follow = "live";
  connection.followMessage = "";
  updateConnection();
  cancelRename();
  view = new ConversationView(id);
  ui.messages.replaceChildren();
  highlightCurrent();
  if (id === null) {
    ui.title.textContent = NEW_TITLE;
    ui.badge.hidden = true;
    ui.actions.hidden = true;
    document.title = "keepstream";
    updateComposer();
    return;
  }
  ui.title.textContent = titleFromList(id) ?? "";
  ui.actions.hidden = false;
  updateComposer();
  await reloadConversation(view);
  if (view?.id === id && !MOBILE.matches) ui.input.focus({ preventScroll: true });
}

/** Read the session again and bring the page in line with it (messages are kept by id).
 * Reloads may overlap; only an answer newer than the last one rendered is rendered. */
async function reloadConversation(target = view) {
  if (!target || target.id === null) return;
  const seq = ++target.reloads;
  try {
    const session = await api("GET", sessionPath(target.id), undefined, { signal: target.signal });
    if (target !== view || seq < target.rendered) return;
    target.rendered = seq;
    renderConversation(target, session);
  } catch (error) {
    if (target.signal.aborted || target !== view) return;
    if (error instanceof KeepstreamError && error.status === 404) {
      forgetSession(target.id);
      goHome();
      showError("That chat was not found; it may have been deleted.");
      return;
    }
    if (error instanceof KeepstreamError && error.status === 401) return;
    showError(describe(error));
  }
}

function renderConversation(target, session) {
  target.session = session;
  ui.title.textContent = session.title;
  document.title = `${session.title} · keepstream`;
  const status = session.status;
  ui.badge.hidden = status === "active";
  ui.badge.textContent = status === "closed" ? "Closed" : status === "paused" ? "Paused" : "";
  ui.toggleClosedLabel.textContent = status === "closed" ? "Reopen chat" : "Close chat";
  ui.toggleClosed.title = ui.toggleClosedLabel.textContent;
  ui.toggleClosed.querySelector("use").setAttribute("href", status === "closed" ? "#i-open" : "#i-archive");

  const stick = nearBottom() || target.messages.size === 0;
  const seen = new Set();
  let previous = null;
  for (const message of session.messages) {
    if (message.role !== "user" && message.role !== "assistant") continue;
    seen.add(message.id);
    let item = target.messages.get(message.id);
    if (!item) {
      item = new MessageView(message);
      target.messages.set(message.id, item);
      if (item.role === "assistant") startAnswer(target, item, message);
    }
    const expected = previous ? previous.el.nextElementSibling : ui.messages.firstElementChild;
    if (expected !== item.el) {
      if (previous) previous.el.after(item.el);
      else ui.messages.prepend(item.el);
    }
    previous = item;
  }
  for (const [id, item] of target.messages) {
    if (!seen.has(id)) {
      item.el.remove();
      target.messages.delete(id);
    }
  }
  if (target.pendingUser) {
    if (seen.size && target.pendingUser.sent) {
      target.pendingUser.el.remove();
      target.pendingUser = null;
    } else {
      ui.messages.append(target.pendingUser.el);
    }
  }
  updateComposer();
  if (stick) scrollToBottom();
}

/** Show an assistant message: from its snapshot only when finished, else followed live. */
function startAnswer(target, item, message) {
  if (isTerminal(message.generation_status)) {
    item.finish(message.generation_status, null, message.content ?? "");
    if (message.generation_status === "failed") {
      // The session shows the text; the reason is in the generation's snapshot.
      ks.getGeneration(item.generationId, { signal: target.signal })
        .then((snapshot) => item.finish(snapshot.status, snapshot.error, snapshot.text))
        .catch(() => {});
    }
    return;
  }
  followAnswer(target, item);
}

function followAnswer(target, item, snapshot) {
  if (item.following || item.final) return;
  item.following = true;
  item.setBusy(true);
  openAnswer(ks, item.generationId, {
    signal: target.signal,
    snapshot,
    onSnapshot: (s) => {
      item.status = s.status;
      item.setText(s.text ?? "");
    },
    onDelta: (text) => item.push(text),
    onStatus: (status) => {
      item.status = status;
    },
    onFinal: (final) => {
      const stick = target === view && nearBottom();
      item.finish(final.status, final.error, final.text);
      if (stick) scrollToBottom();
      markIdle(target.id, item.generationId);
      if (target === view) {
        updateComposer();
        refreshSessionsSoon();
      }
    },
    onState: (state, info) => {
      if (target !== view) return;
      if (state === "reconnecting") {
        connection.follow = "reconnecting";
        connection.followMessage = retryingIn(info.delay ?? 1000);
      } else if (state === "offline") {
        connection.follow = "offline";
        connection.followMessage = "";
      } else {
        connection.follow = "live";
        connection.followMessage = "";
        if (state === "live") connection.requestFailed = false;
      }
      updateConnection();
    },
  })
    .catch((error) => {
      item.following = false;
      if (target !== view) return;
      connection.follow = "live";
      connection.followMessage = "";
      updateConnection();
      if (error instanceof KeepstreamError && error.status === 401) {
        askForKey();
        return;
      }
      if (error instanceof KeepstreamError && error.status === 404) {
        reloadConversation(target);
        return;
      }
      showError(describe(error, "answer"));
    })
    .finally(() => {
      if (target === view) updateComposer();
    });
}

function updateComposer() {
  const running = view?.running ?? null;
  ui.stop.hidden = !running;
  ui.stop.disabled = !running || stopping;
  ui.send.disabled = sending;
  const last = view?.lastAssistant ?? null;
  const paused = view?.session?.status === "paused";
  for (const message of view?.messages.values() ?? []) {
    if (message.retryButton) message.retryButton.hidden = message !== last || !!running || paused;
  }
  const empty = !view || view.id === null || (view.session && view.messages.size === 0 && !view.pendingUser);
  ui.welcome.hidden = !empty || (view?.id !== null && !view?.session);
  ui.app.classList.toggle("is-empty", !!empty);
}

// -- sending, stopping, retrying --------------------------------------------------------------

let sending = false;
let stopping = false;
let draft = null; // {content, key}: a send the server may have taken, to retry with its key

async function send() {
  const content = ui.input.value;
  if (!content.trim() || sending) return;
  clearError();
  sending = true;
  updateComposer();
  if (!draft || draft.content !== content) draft = { content, key: newKey() };
  let target = view;
  let pending = null;
  try {
    if (!target || target.id === null) {
      const created = await api("POST", "/v1/sessions", { title: NEW_TITLE });
      rememberSession(created);
      target = await navigate(created.id);
    }
    const first =
      target.session?.title === NEW_TITLE &&
      (target.session?.message_count ?? 0) === 0 &&
      target.messages.size === 0;
    pending = new MessageView({ id: "pending", role: "user", content });
    pending.el.classList.add("pending");
    target.pendingUser = pending;
    ui.messages.append(pending.el);
    updateComposer();
    scrollToBottom();
    const posted = await withRetries(() =>
      api("POST", `${sessionPath(target.id)}/messages`, { content }, { idempotencyKey: draft.key }),
    );
    draft = null;
    if (ui.input.value === content) {
      ui.input.value = "";
      autosize();
    }
    pending.sent = true;
    if (first) await renameTo(target, titleFor(content)).catch(() => {});
    await reloadConversation(target);
    const answer = posted?.generation_id ? target.messages.get(`msg_${posted.generation_id}`) : null;
    if (answer && !answer.following && !answer.final) followAnswer(target, answer, posted.generation);
    refreshSessionsSoon();
  } catch (error) {
    if (pending && target?.pendingUser === pending) {
      pending.el.remove();
      target.pendingUser = null;
    }
    if (!(error instanceof KeepstreamError && error.status === 401)) showError(describe(error));
  } finally {
    sending = false;
    updateComposer();
  }
}

async function withRetries(call) {
  for (let attempt = 1; ; attempt++) {
    try {
      return await call();
    } catch (error) {
      const again = error instanceof KeepstreamError && error.retryable && error.status !== 429;
      if (!again || attempt >= SEND_ATTEMPTS) throw error;
      await new Promise((resolve) => setTimeout(resolve, 400 * 2 ** attempt));
    }
  }
}

/** The first words of a message, as a chat's title. */
function titleFor(content) {
  const words = content.replace(/\s+/g, " ").trim();
  return Array.from(words).slice(0, TITLE_CHARS).join("").trim() || NEW_TITLE;
}

async function stopAnswer() {
  const running = view?.running;
  if (!running || stopping) return;
  stopping = true;
  updateComposer();
  try {
    await api("POST", `/v1/generations/${encodeURIComponent(running.generationId)}/cancel`);
  } catch (error) {
    showError(describe(error, "answer"));
  } finally {
    stopping = false;
    updateComposer();
  }
}

async function retryAnswer() {
  const target = view;
  if (!target?.id || target.running || sending) return;
  clearError();
  sending = true;
  updateComposer();
  try {
    const posted = await withRetries(() =>
      api("POST", `${sessionPath(target.id)}/regenerate`, undefined, { idempotencyKey: newKey() }),
    );
    await reloadConversation(target);
    const answer = posted?.generation_id ? target.messages.get(`msg_${posted.generation_id}`) : null;
    if (answer && !answer.following && !answer.final) followAnswer(target, answer, posted.generation);
    refreshSessionsSoon();
  } catch (error) {
    if (!(error instanceof KeepstreamError && error.status === 401)) showError(describe(error));
  } finally {
    sending = false;
    updateComposer();
  }
}

// -- session actions --------------------------------------------------------------------------

async function newChat() {
  clearError();
  closeSidebar();
  try {
    const created = await api("POST", "/v1/sessions", { title: NEW_TITLE });
    rememberSession(created);
    await navigate(created.id);
    ui.input.focus();
    refreshSessionsSoon();
  } catch (error) {
    if (!(error instanceof KeepstreamError && error.status === 401)) showError(describe(error));
  }
}

async function renameTo(target, title) {
  const session = await api("PATCH", sessionPath(target.id), { title });
  if (target === view && target.session) {
    target.session.title = session.title;
    ui.title.textContent = session.title;
    document.title = `${session.title} · keepstream`;
  }
  rememberSession(session);
  return session;
}

function startRename() {
  if (!view?.id) return;
  ui.renameInput.value = view.session?.title ?? ui.title.textContent;
  ui.renameForm.hidden = false;
  ui.title.hidden = true;
  ui.renameInput.focus();
  ui.renameInput.select();
}

function cancelRename() {
  if (ui.renameForm.hidden) return;
  ui.renameForm.hidden = true;
  ui.title.hidden = false;
}

async function submitRename(event) {
  event.preventDefault();
  const title = ui.renameInput.value.trim();
  const target = view;
  cancelRename();
  if (!title || !target?.id || title === target.session?.title) return;
  try {
    await renameTo(target, title);
    refreshSessionsSoon();
  } catch (error) {
    if (!(error instanceof KeepstreamError && error.status === 401)) showError(describe(error));
  }
}

async function toggleClosed() {
  const target = view;
  if (!target?.session) return;
  const status = target.session.status === "closed" ? "active" : "closed";
  try {
    const session = await api("PATCH", sessionPath(target.id), { status });
    if (target === view) renderConversation(target, { ...target.session, ...session, messages: target.session.messages });
    refreshSessionsSoon();
  } catch (error) {
    if (!(error instanceof KeepstreamError && error.status === 401)) showError(describe(error));
  }
}

async function deleteChat() {
  const target = view;
  if (!target?.id) return;
  const title = target.session?.title ?? "this chat";
  if (!confirm(`Delete “${title}”? Its messages and answers are deleted for good.`)) return;
  try {
    await api("DELETE", sessionPath(target.id));
  } catch (error) {
    if (!(error instanceof KeepstreamError && error.status === 404)) {
      if (!(error instanceof KeepstreamError && error.status === 401)) showError(describe(error));
      return;
    }
  }
  forgetSession(target.id);
  goHome();
  refreshSessionsSoon();
}

// -- the sidebar ------------------------------------------------------------------------------

const sessions = new Map(); // id -> {summary, li, link, time, dot}
let order = [];

function rememberSession(session) {
  const known = sessions.get(session.id);
  const summary = { active_generation_id: null, ...(known?.summary ?? {}), ...session };
  renderSessions(
    [summary, ...order.filter((id) => id !== session.id).map((id) => sessions.get(id).summary)],
    { partial: true },
  );
}

/** An answer ended: stop the chat's "generating" indicator without waiting for a refresh. */
function markIdle(id, generationId) {
  const entry = sessions.get(id);
  if (!entry || entry.summary.active_generation_id !== generationId) return;
  entry.summary = { ...entry.summary, active_generation_id: null };
  renderSessions(order.map((other) => sessions.get(other).summary));
}

function forgetSession(id) {
  const known = sessions.get(id);
  if (!known) return;
  known.li.remove();
  sessions.delete(id);
  order = order.filter((other) => other !== id);
  ui.sessionsEmpty.hidden = order.length > 0;
}

function titleFromList(id) {
  return sessions.get(id)?.summary.title ?? null;
}

function renderSessions(list, { partial = false } = {}) {
  const seen = new Set();
  let previous = null;
  for (const summary of list) {
    seen.add(summary.id);
    let entry = sessions.get(summary.id);
    if (!entry) {
      entry = sessionEntry(summary.id);
      sessions.set(summary.id, entry);
    }
    entry.summary = summary;
    if (entry.link.textContent !== summary.title) entry.link.textContent = summary.title;
    const generating = !!summary.active_generation_id;
    entry.li.classList.toggle("generating", generating);
    entry.li.classList.toggle("closed", summary.status === "closed");
    entry.state.textContent = generating ? "Generating" : summary.status === "closed" ? "Closed" : "";
    entry.state.hidden = !entry.state.textContent;
    const ago = timeAgo(summary.last_activity_at);
    if (entry.time.textContent !== ago) entry.time.textContent = ago;
    const expected = previous ? previous.li.nextElementSibling : ui.sessionList.firstElementChild;
    if (expected !== entry.li) {
      if (previous) previous.li.after(entry.li);
      else ui.sessionList.prepend(entry.li);
    }
    previous = entry;
  }
  if (!partial) {
    for (const [id, entry] of sessions) {
      if (!seen.has(id)) {
        entry.li.remove();
        sessions.delete(id);
      }
    }
  }
  order = list.map((s) => s.id);
  ui.sessionsEmpty.hidden = order.length > 0;
  highlightCurrent();
}

function sessionEntry(id) {
  const li = document.createElement("li");
  li.className = "session";
  const link = document.createElement("a");
  link.href = `#/sessions/${encodeURIComponent(id)}`;
  link.className = "session-link";
  const meta = document.createElement("div");
  meta.className = "session-meta";
  meta.setAttribute("aria-hidden", "true");
  const dot = document.createElement("span");
  dot.className = "session-dot";
  const state = document.createElement("span");
  state.className = "session-state";
  const time = document.createElement("span");
  time.className = "session-time";
  meta.append(dot, state, time);
  li.append(link, meta);
  link.addEventListener("click", () => closeSidebar());
  return { li, link, meta, dot, state, time, summary: null };
}

function highlightCurrent() {
  for (const [id, entry] of sessions) {
    const current = view?.id === id;
    if (current) entry.link.setAttribute("aria-current", "page");
    else entry.link.removeAttribute("aria-current");
    entry.li.classList.toggle("current", current);
  }
}

function timeAgo(seconds) {
  const age = Math.max(0, Date.now() / 1000 - seconds);
  if (age < 45) return "just now";
  if (age < 3600) return `${Math.max(1, Math.round(age / 60))} min ago`;
  if (age < 86400) return `${Math.round(age / 3600)} h ago`;
  if (age < 2 * 86400) return "yesterday";
  if (age < 7 * 86400) return `${Math.floor(age / 86400)} days ago`;
  return new Date(seconds * 1000).toLocaleDateString(undefined, { month: "short", day: "numeric" });
}

let refreshTimer = 0;
let refreshFailures = 0;
let refreshing = null;

async function refreshSessions() {
  if (refreshing) return refreshing;
  clearTimeout(refreshTimer);
  refreshing = (async () => {
    let wait = REFRESH_EVERY;
    try {
      const list = await api("GET", "/v1/sessions?limit=100");
      refreshFailures = 0;
      connection.refreshMessage = "";
      renderSessions(list.data);
      checkCurrent(list.data);
    } catch (error) {
      if (error instanceof KeepstreamError && error.status === 401) {
        wait = REFRESH_EVERY * 4;
      } else {
        refreshFailures += 1;
        wait = Math.min(REFRESH_BACKOFF_MAX, 1000 * 2 ** (refreshFailures - 1));
        if (error instanceof KeepstreamError && error.retryable) {
          connection.refreshMessage = navigator.onLine ? retryingIn(wait) : "";
        }
      }
    } finally {
      updateConnection();
      refreshing = null;
      refreshTimer = setTimeout(refreshSessions, wait);
    }
  })();
  return refreshing;
}

function refreshSessionsSoon() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(refreshSessions, 150);
}

/** Another tab (or client) changed the open chat: read it again. */
function checkCurrent(list) {
  if (!view?.id || !view.session || sending) return;
  const summary = list.find((s) => s.id === view.id);
  if (!summary) {
    reloadConversation(view); // gone? the reload says so in plain words
    return;
  }
  const known = view.session;
  const runningHere = view.running?.generationId ?? null;
  if (
    summary.message_count !== known.message_count ||
    summary.status !== known.status ||
    summary.title !== known.title ||
    (summary.active_generation_id && summary.active_generation_id !== runningHere)
  ) {
    reloadConversation(view);
  }
}

// -- the API key ------------------------------------------------------------------------------

function askForKey() {
  if (ui.keyDialog.open) return;
  const hadKey = !!ks.apiKey;
  ui.keyError.hidden = !hadKey;
  ui.keyError.textContent = hadKey ? "The server did not accept the saved key. Enter another one." : "";
  ui.keyInput.value = "";
  if (typeof ui.keyDialog.showModal === "function") ui.keyDialog.showModal();
  else ui.keyDialog.setAttribute("open", "");
  ui.keyInput.focus();
}

async function submitKey(event) {
  event.preventDefault();
  const key = ui.keyInput.value.trim();
  if (!key) return;
  saveKey(key);
  ui.keyDialog.close();
  clearError();
  const current = view?.id ?? null;
  view?.close();
  view = null;
  await refreshSessions();
  await openConversation(current);
}

// -- routing, sidebar on phones, keyboard -----------------------------------------------------

function routeId() {
  const match = /^#\/sessions\/([^/?#]+)/.exec(location.hash);
  return match ? decodeURIComponent(match[1]) : null;
}

/** Go to a chat and wait until it is open. */
async function navigate(id) {
  const hash = `#/sessions/${encodeURIComponent(id)}`;
  if (location.hash !== hash) history.pushState(null, "", hash);
  await openConversation(id);
  return view;
}

/** Leave the open chat for the empty page (without waiting for hashchange). */
function goHome() {
  if (location.hash && location.hash !== "#/") history.pushState(null, "", "#/");
  openConversation(null);
}

function onRoute() {
  closeSidebar();
  const id = routeId();
  if (id !== (view?.id ?? null)) clearError();
  openConversation(id);
}

function openSidebar() {
  ui.app.classList.add("sidebar-open");
  ui.toggle.setAttribute("aria-expanded", "true");
  ui.scrim.hidden = false;
  (ui.sessionList.querySelector("[aria-current]") ?? ui.closeSidebar).focus();
}

function closeSidebar() {
  if (!ui.app.classList.contains("sidebar-open")) return;
  ui.app.classList.remove("sidebar-open");
  ui.toggle.setAttribute("aria-expanded", "false");
  ui.scrim.hidden = true;
  if (ui.sidebar.contains(document.activeElement)) ui.toggle.focus();
}

function autosize() {
  ui.input.style.height = "auto";
  ui.input.style.height = `${Math.min(ui.input.scrollHeight, 240)}px`;
}

function onResume() {
  if (document.visibilityState === "hidden") return;
  refreshSessions();
  if (view?.id && !view.running) reloadConversation(view);
}

function wire() {
  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  ui.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing && !event.altKey) {
      event.preventDefault();
      send();
    }
  });
  ui.input.addEventListener("input", autosize);
  ui.stop.addEventListener("click", stopAnswer);
  for (const button of ui.newChat) button.addEventListener("click", newChat);
  ui.suggestions.addEventListener("click", (event) => {
    const button = event.target.closest("button");
    if (!button) return;
    ui.input.value = button.textContent.trim();
    autosize();
    send();
  });
  ui.rename.addEventListener("click", startRename);
  ui.renameForm.addEventListener("submit", submitRename);
  ui.renameCancel.addEventListener("click", cancelRename);
  ui.renameInput.addEventListener("keydown", (event) => {
    if (event.key === "Escape") {
      event.stopPropagation();
      cancelRename();
      ui.rename.focus();
    }
  });
  ui.toggleClosed.addEventListener("click", toggleClosed);
  ui.remove.addEventListener("click", deleteChat);
  ui.alertDismiss.addEventListener("click", clearError);
  ui.toggle.addEventListener("click", () =>
    ui.app.classList.contains("sidebar-open") ? closeSidebar() : openSidebar(),
  );
  ui.closeSidebar.addEventListener("click", closeSidebar);
  ui.scrim.addEventListener("click", closeSidebar);
  ui.forgetKey.addEventListener("click", () => {
    saveKey(null);
    refreshSessions();
  });
  ui.keyForm.addEventListener("submit", submitKey);
  ui.keyDialog.addEventListener("cancel", (event) => event.preventDefault());
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && ui.app.classList.contains("sidebar-open")) closeSidebar();
  });
  MOBILE.addEventListener("change", closeSidebar);
  window.addEventListener("hashchange", onRoute);
  window.addEventListener("popstate", onRoute);
  window.addEventListener("online", () => {
    updateConnection();
    onResume();
  });
  window.addEventListener("offline", updateConnection);
  window.addEventListener("focus", onResume);
  document.addEventListener("visibilitychange", onResume);
  // Relative times move on even when nothing else does.
  setInterval(() => {
    for (const entry of sessions.values()) {
      const ago = timeAgo(entry.summary.last_activity_at);
      if (entry.time.textContent !== ago) entry.time.textContent = ago;
    }
  }, 30000);
}

wire();
saveKey(ks.apiKey);
updateConnection();
autosize();
refreshSessions();
openConversation(routeId());
