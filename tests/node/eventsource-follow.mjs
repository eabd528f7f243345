// Follows one keepstream events URL with the real `eventsource` package, as a browser's
// EventSource would, and prints what it saw as one JSON line: the text, how many times it
// connected, the event ids, the final status and the errors (with HTTP status codes).
import { EventSource } from 'eventsource';

const url = process.env.EVENTS_URL;
const deadline = Number(process.env.DEADLINE_MS ?? 20000);
const TERMINAL = new Set(['completed', 'failed', 'cancelled', 'interrupted']);

let text = '';
let opens = 0;
let status = null;
const ids = [];
const errors = [];
// eventsource 5.x does not keep Node alive while it waits to reconnect.
const keepAlive = setInterval(() => {}, 1000);
const es = new EventSource(url);

function finish(timedOut) {
  es.close();
  clearInterval(keepAlive);
  clearTimeout(timer);
  console.log(JSON.stringify({ text, opens, status, ids, errors, timedOut }));
}

const timer = setTimeout(() => finish(true), deadline);
es.addEventListener('open', () => { opens += 1; });
es.addEventListener('delta', (event) => {
  text += JSON.parse(event.data).text;
  ids.push(event.lastEventId);
});
es.addEventListener('status', (event) => {
  ids.push(event.lastEventId);
  const value = JSON.parse(event.data).status;
  if (TERMINAL.has(value)) status = value;
});
es.addEventListener('error', (event) => {
  errors.push({ code: event.code ?? null, message: event.message ?? null });
  // CLOSED: the client gave up for good (a 204, or a refusal); otherwise it reconnects.
  if (es.readyState === EventSource.CLOSED) finish(false);
});
