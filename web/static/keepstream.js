// keepstream.js — a small browser client for keepstream's native API, and the resume logic
// that makes an answer survive tab switches, reloads, lost networks and server restarts.
//
// One ES module with no dependencies; import it as it is:
//
//   import { Keepstream, openAnswer } from "/static/keepstream.js";
//   const ks = new Keepstream({ baseUrl: "https://keepstream.example.com", apiKey });
//   await openAnswer(ks, generationId, {
//     onSnapshot: (snapshot) => (output.textContent = snapshot.text),
//     onDelta: (text) => (output.textContent += text),
//     onFinal: (final) => console.log(final.status),
//   });
//
// It follows events with `fetch` streaming rather than `EventSource`, so it can send the API
// key in the `Authorization` header.

/** Statuses after which a generation never changes again. */
export const TERMINAL_STATUSES = Object.freeze(["completed", "failed", "cancelled", "interrupted"]);

/** Default reconnect policy of {@link openAnswer} (milliseconds). */
export const DEFAULT_RETRY = Object.freeze({
  initial: 250, // the first wait after a failure
  max: 5000, // the longest wait between two attempts
  jitter: 0.5, // each wait is randomised by ±jitter/2 of itself
  attempts: Infinity, // attempts per outage before giving up (a successful connection resets it)
  stallTimeout: 45000, // reconnect when an open stream sends nothing (not even a ping) this long
});

/**
 * Whether a generation status is final.
 * @param {string | null | undefined} status
 * @returns {boolean}
 */
export function isTerminal(status) {
  return TERMINAL_STATUSES.includes(status ?? "");
}

/**
 * An API error answer (`{"error": {"type", "message"}}`), or a server that could not be
 * reached (`status` 0, `type` "unreachable").
 */
export class KeepstreamError extends Error {
  /**
   * @param {string} message the server's message, in plain words
   * @param {{status?: number, type?: string, retryAfter?: number | null}} [details]
   */
  constructor(message, { status = 0, type = "unreachable", retryAfter = null } = {}) {
    super(message);
    this.name = "KeepstreamError";
    /** HTTP status; 0 when no answer came. */
    this.status = status;
    /** The server's `error.type` ("not_found", "session_busy", …), or "unreachable". */
    this.type = type;
    /** Seconds from `Retry-After`, when the server sent one. */
    this.retryAfter = retryAfter;
  }

  /** Whether trying again later may work: no answer, `429`, or a `5xx`. */
  get retryable() {
    return this.status === 0 || this.status === 408 || this.status === 429 || this.status >= 500;
  }
}

/**
 * A connection to one keepstream server: its base URL, the API key, and the `fetch` to use.
 */
export class Keepstream {
  /**
   * @param {object} [options]
   * @param {string} [options.baseUrl] where the API is (`""`: this page's origin; a mounted
   *   app's prefix, e.g. `"https://example.com/ks"`). Paths are appended to it.
   * @param {string | null} [options.apiKey] sent as `Authorization: Bearer <key>` when set.
   * @param {typeof fetch} [options.fetch] the fetch implementation (default: the global one).
   */
  constructor({ baseUrl = "", apiKey = null, fetch: fetchImpl } = {}) {
    this.baseUrl = String(baseUrl).replace(/\/+$/, "");
    this.apiKey = apiKey || null;
    this.fetch = fetchImpl ?? ((...args) => globalThis.fetch(...args));
  }

  /**
   * The absolute URL of an API path.
   * @param {string} path e.g. `/v1/sessions`
   * @returns {string}
   */
  url(path) {
    return this.baseUrl + path;
  }

  /**
   * Headers every request carries, plus `extra`.
   * @param {Record<string, string>} [extra]
   * @returns {Record<string, string>}
   */
  headers(extra = {}) {
    const headers = { ...extra };
    if (this.apiKey) headers.Authorization = `Bearer ${this.apiKey}`;
    return headers;
  }

  /**
   * One JSON request. Resolves with the parsed answer (`null` for `204`); rejects with a
   * {@link KeepstreamError} for an error answer or an unreachable server, and with the
   * signal's reason when aborted. Never retries by itself.
   *
   * @param {string} method `GET`, `POST`, `PATCH` or `DELETE`
   * @param {string} path e.g. `/v1/sessions/ses_…/messages`
   * @param {unknown} [body] sent as JSON when not `undefined`
   * @param {object} [options]
   * @param {string} [options.idempotencyKey] `Idempotency-Key`: a retry gets the first answer
   * @param {AbortSignal} [options.signal]
   * @param {Record<string, string>} [options.headers]
   * @returns {Promise<any>}
   */
  async request(method, path, body, { idempotencyKey, signal, headers = {} } = {}) {
    const extra = { Accept: "application/json", ...headers };
    if (body !== undefined) extra["Content-Type"] ??= "application/json";
    if (idempotencyKey) extra["Idempotency-Key"] = idempotencyKey;
    let response;
    try {
      response = await this.fetch(this.url(path), {
        method,
        headers: this.headers(extra),
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: "no-store",
        signal,
      });
    } catch (error) {
      if (signal?.aborted) throw signal.reason ?? error;
      throw new KeepstreamError("The server did not answer.", { status: 0 });
    }
    if (!response.ok) throw await errorFrom(response);
    if (response.status === 204) return null;
    const text = await response.text();
    return text ? JSON.parse(text) : null;
  }

  /**
   * A generation's snapshot: `status`, `text` so far, `next_offset`, `error`, `usage`.
   * @param {string} generationId
   * @param {{signal?: AbortSignal}} [options]
   */
  getGeneration(generationId, { signal } = {}) {
    return this.request("GET", `/v1/generations/${encodeURIComponent(generationId)}`, undefined, {
      signal,
    });
  }

  /**
   * Stop a generation, keeping its text (idempotent). Resolves with its snapshot.
   * @param {string} generationId
   */
  cancelGeneration(generationId) {
    return this.request("POST", `/v1/generations/${encodeURIComponent(generationId)}/cancel`);
  }
}

/**
 * The {@link KeepstreamError} an error response stands for.
 * @param {Response} response
 * @returns {Promise<KeepstreamError>}
 */
async function errorFrom(response) {
  let type = "http_error";
  let message = response.statusText || `HTTP ${response.status}`;
  try {
    const body = await response.json();
    if (body && typeof body.error === "object" && body.error) {
      type = String(body.error.type ?? type);
      message = String(body.error.message ?? message);
    }
  } catch {
    // Not our JSON (a proxy's page, say): keep the status line.
  }
  const retryAfter = Number.parseFloat(response.headers.get("Retry-After") ?? "");
  return new KeepstreamError(message, {
    status: response.status,
    type,
    retryAfter: Number.isFinite(retryAfter) ? retryAfter : null,
  });
}

/**
 * An incremental Server-Sent Events parser (the WHATWG event stream format): feed it text as
 * it arrives, in pieces of any size, and it returns the events completed so far. Handles
 * `id:`, `event:`, `data:` (several lines are joined with `\n`), `retry:`, comments, and
 * LF, CRLF or CR line ends, even split across pieces.
 */
export class SSEParser {
  constructor() {
    this.buffer = "";
    this.data = [];
    this.event = "";
    /** The last event id seen (it persists across events, as in `EventSource`). */
    this.lastEventId = "";
    /** The last `retry:` value (milliseconds), or null. */
    this.retry = null;
  }

  /**
   * Parse more text.
   * @param {string} text
   * @returns {{id: string, event: string, data: string}[]} events completed by this text
   */
  push(text) {
    this.buffer += text;
    const events = [];
    let start = 0;
    const buffer = this.buffer;
    for (;;) {
      let end = start;
      while (end < buffer.length && buffer[end] !== "\n" && buffer[end] !== "\r") end++;
      if (end >= buffer.length) break; // an incomplete line: wait for more
      let next = end + 1;
      if (buffer[end] === "\r") {
        if (next >= buffer.length) break; // a CR at the end may be half of a CRLF
        if (buffer[next] === "\n") next++;
      }
      const event = this.line(buffer.slice(start, end));
      if (event) events.push(event);
      start = next;
    }
    this.buffer = buffer.slice(start);
    return events;
  }

  /**
   * The end of the stream: a last line without its line end still counts, but an event
   * without its blank line is dropped (as the format says).
   */
  end() {
    if (this.buffer && this.buffer !== "\r") this.line(this.buffer.replace(/\r$/, ""));
    this.buffer = "";
    this.data = [];
    this.event = "";
  }

  /** @param {string} line */
  line(line) {
    if (line === "") {
      if (!this.data.length) {
        this.event = "";
        return null;
      }
      const event = { id: this.lastEventId, event: this.event || "message", data: this.data.join("\n") };
      this.data = [];
      this.event = "";
      return event;
    }
    if (line[0] === ":") return null; // a comment (keep-alive ping)
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value[0] === " ") value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "event") this.event = value;
    else if (field === "id") {
      if (!value.includes("\0")) this.lastEventId = value;
    } else if (field === "retry" && /^\d+$/.test(value)) this.retry = Number(value);
    return null;
  }
}

/**
 * The events of a `fetch` response body, as they arrive.
 * @param {ReadableStream<Uint8Array>} body
 * @param {(received: number) => void} [onBytes] called whenever bytes arrive (pings too)
 * @returns {AsyncGenerator<{id: string, event: string, data: string}>}
 */
export async function* readEvents(body, onBytes) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  const parser = new SSEParser();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      onBytes?.(value.byteLength);
      yield* parser.push(decoder.decode(value, { stream: true }));
    }
    yield* parser.push(decoder.decode());
    parser.end();
  } finally {
    reader.releaseLock?.();
    body.cancel().catch(() => {});
  }
}

/**
 * @typedef {object} AnswerSnapshot
 * @property {string} id
 * @property {string} status queued, running, completed, failed, cancelled or interrupted
 * @property {string} text the text so far
 * @property {number} next_offset where following resumes
 * @property {{type: string, message: string} | null} error
 * @property {object | null} usage
 */

/**
 * @typedef {object} AnswerFinal
 * @property {string} status completed, failed, cancelled or interrupted
 * @property {string} text the whole text
 * @property {{type: string, message: string} | null} error
 * @property {object | null} usage
 * @property {number} offset the offset after the final event
 */

/**
 * @typedef {"connecting" | "live" | "reconnecting" | "offline"} AnswerState
 */

/**
 * Show one answer, exactly once, however the connection behaves.
 *
 * First the snapshot (`GET /v1/generations/{id}`, or `options.snapshot` when you have one):
 * `onSnapshot` gets its `text` to render. A finished answer ends there (`onFinal`), never
 * re-streamed. Otherwise its events are followed from the snapshot's `next_offset`
 * (`GET …/events?offset=`, with `fetch` streaming so the API key header is sent), each delta
 * to `onDelta`, until the final status event (`onFinal`).
 *
 * Whenever the stream breaks (a dropped connection, a server restarting, a `5xx` or `429`, a
 * stream silent for `retry.stallTimeout`) it reconnects from the offset after the last event
 * it delivered, so no delta is lost or repeated, waiting with exponential backoff and jitter
 * between attempts. It goes again at once when the browser comes back `online`, and when
 * the tab becomes visible or gets focus. While the browser is offline it waits for `online`.
 * A `204` (nothing left) reads the snapshot for the final state.
 *
 * Errors that retrying cannot fix (`401`, `404`, `400`) reject the promise with a
 * {@link KeepstreamError}; so does running out of `retry.attempts`.
 *
 * @param {Keepstream} ks
 * @param {string} generationId
 * @param {object} [options]
 * @param {(snapshot: AnswerSnapshot) => void} [options.onSnapshot] the text so far, once
 * @param {(text: string, info: {offset: number, text: string}) => void} [options.onDelta]
 *   each new piece of text, with the offset after it and the whole text so far
 * @param {(final: AnswerFinal) => void} [options.onFinal] the final state, once
 * @param {(status: string) => void} [options.onStatus] non-final status events (running)
 * @param {(state: AnswerState, info: {error?: KeepstreamError, delay?: number, attempt?: number}) => void} [options.onState]
 *   the connection's state: `live` once a stream is open, `reconnecting` with the wait
 *   (ms) before the next attempt and the error that caused it, `offline` while the browser
 *   has no network
 * @param {AbortSignal} [options.signal] stops following (the answer goes on on the server)
 * @param {AnswerSnapshot} [options.snapshot] a snapshot you already have (e.g. from posting
 *   a message), to skip the first request
 * @param {Partial<typeof DEFAULT_RETRY>} [options.retry] the reconnect policy
 * @returns {Promise<AnswerFinal | null>} the final state, or `null` when aborted
 */
export async function openAnswer(ks, generationId, options = {}) {
  const { onSnapshot, onDelta, onFinal, onStatus, onState, signal } = options;
  const retry = { ...DEFAULT_RETRY, ...(options.retry ?? {}) };
  const id = encodeURIComponent(generationId);
  const wake = wakeUps(signal);
  let snapshot = options.snapshot ?? null;
  let text = "";
  let offset = 0;
  let attempt = 0;
  let state = "";
  const report = (next, info = {}) => {
    if (next === state && next !== "reconnecting") return;
    state = next;
    onState?.(next, info);
  };
  const finish = (status, error, usage) => {
    const final = { status, text, error: error ?? null, usage: usage ?? null, offset };
    onFinal?.(final);
    return final;
  };

  try {
    report("connecting");
    // 1. The snapshot: what to render first, and where to follow from.
    while (!snapshot) {
      try {
        snapshot = await ks.getGeneration(generationId, { signal });
      } catch (error) {
        await backOff(error);
      }
    }
    text = snapshot.text ?? "";
    offset = snapshot.next_offset ?? 0;
    onSnapshot?.(snapshot);
    if (isTerminal(snapshot.status)) {
      report("live");
      return finish(snapshot.status, snapshot.error, snapshot.usage);
    }

    // 2. Follow from the snapshot's offset, resuming from the last delivered one.
    for (;;) {
      if (signal?.aborted) return null;
      if (globalThis.navigator?.onLine === false) {
        report("offline");
        await wake.next(Infinity);
        continue;
      }
      const connection = new AbortController();
      const stopConnection = () => connection.abort();
      signal?.addEventListener("abort", stopConnection, { once: true });
      wake.onOffline = stopConnection;
      let stall = null;
      const arm = () => {
        clearTimeout(stall);
        stall = setTimeout(stopConnection, retry.stallTimeout);
      };
      try {
        arm();
        let response;
        try {
          response = await ks.fetch(ks.url(`/v1/generations/${id}/events?offset=${offset}`), {
            headers: ks.headers({ Accept: "text/event-stream" }),
            cache: "no-store",
            signal: connection.signal,
          });
        } catch {
          throw new KeepstreamError("The server did not answer.", { status: 0 });
        }
        if (response.status === 204) {
          // Nothing is left after our offset: the snapshot has the final state.
          snapshot = await ks.getGeneration(generationId, { signal });
          report("live");
          if (isTerminal(snapshot.status)) {
            return finish(snapshot.status, snapshot.error, snapshot.usage);
          }
          throw new KeepstreamError("The answer's stream ended early.", { status: 0 });
        }
        if (!response.ok) throw await errorFrom(response);
        attempt = 0;
        report("live");
        try {
          for await (const event of readEvents(response.body, arm)) {
            const next = Number.parseInt(event.id, 10);
            let data;
            try {
              data = JSON.parse(event.data);
            } catch {
              continue;
            }
            if (Number.isFinite(next)) offset = next;
            if (event.event === "delta" || data.type === "delta") {
              text += data.text ?? "";
              onDelta?.(data.text ?? "", { offset, text });
            } else if (event.event === "status" || data.type === "status") {
              if (isTerminal(data.status)) return finish(data.status, data.error, data.usage);
              onStatus?.(data.status);
            }
          }
        } catch (error) {
          if (signal?.aborted) return null;
          if (error instanceof KeepstreamError) throw error;
          throw new KeepstreamError("The connection to the server was lost.", { status: 0 });
        }
        // The stream ended without a final status (a server stopping, `--sse-lifetime`).
        throw new KeepstreamError("The connection to the server was lost.", { status: 0 });
      } catch (error) {
        if (signal?.aborted) return null;
        await backOff(error);
      } finally {
        clearTimeout(stall);
        wake.onOffline = null;
        signal?.removeEventListener("abort", stopConnection);
      }
    }
  } catch (error) {
    if (signal?.aborted) return null;
    throw error;
  } finally {
    wake.close();
  }

  /** Wait before the next attempt, or rethrow what waiting cannot fix. */
  async function backOff(error) {
    if (signal?.aborted) throw signal.reason ?? new DOMException("Aborted", "AbortError");
    const retryable = error instanceof KeepstreamError ? error.retryable : false;
    if (!retryable || attempt >= retry.attempts) throw error;
    if (globalThis.navigator?.onLine === false) {
      report("offline", { error });
      await wake.next(Infinity);
      return;
    }
    let delay = Math.min(retry.max, retry.initial * 2 ** attempt);
    delay *= 1 - retry.jitter / 2 + Math.random() * retry.jitter;
    if (error.retryAfter) delay = Math.max(delay, Math.min(error.retryAfter * 1000, retry.max * 4));
    attempt += 1;
    report("reconnecting", { error, delay: Math.round(delay), attempt });
    await wake.next(delay);
  }
}

/**
 * A waiter that ends early when the browser comes back online or the tab comes back into
 * view, and that can drop the open connection when the browser goes offline.
 * @param {AbortSignal | undefined} signal
 */
function wakeUps(signal) {
  let wakeUp = null;
  const target = globalThis.window ?? null;
  const doc = globalThis.document ?? null;
  const api = {
    /** @type {(() => void) | null} called when the browser goes offline */
    onOffline: null,
    /**
     * Resolve after `ms`, or sooner on `online`, focus, visibility or abort.
     * @param {number} ms
     */
    next(ms) {
      return new Promise((resolve) => {
        const timer = Number.isFinite(ms) ? setTimeout(done, ms) : null;
        function done() {
          clearTimeout(timer);
          signal?.removeEventListener("abort", done);
          wakeUp = null;
          resolve();
        }
        wakeUp = done;
        signal?.addEventListener("abort", done, { once: true });
      });
    },
    close() {
      target?.removeEventListener("online", onWake);
      target?.removeEventListener("focus", onWake);
      target?.removeEventListener("offline", onOffline);
      doc?.removeEventListener("visibilitychange", onVisible);
      wakeUp?.();
    },
  };
  function onWake() {
    wakeUp?.();
  }
  function onVisible() {
    if (doc?.visibilityState === "visible") wakeUp?.();
  }
  function onOffline() {
    api.onOffline?.();
  }
  target?.addEventListener("online", onWake);
  target?.addEventListener("focus", onWake);
  target?.addEventListener("offline", onOffline);
  doc?.addEventListener("visibilitychange", onVisible);
  return api;
}
