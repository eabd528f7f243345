// Sends a message with the real DefaultChatTransport, aborts the fetch after the first text
// delta, then resumes with reconnectToStream and assembles the answer with
// readUIMessageStream; finally reconnects once more (null: nothing runs any more).
// Env: KEEPSTREAM_URL, CHAT_ID, TEXT, optional API_KEY.
import { DefaultChatTransport, readUIMessageStream } from 'ai';

const url = process.env.KEEPSTREAM_URL;
const chatId = process.env.CHAT_ID;
const headers = process.env.API_KEY ? { Authorization: `Bearer ${process.env.API_KEY}` } : {};
const transport = new DefaultChatTransport({ api: `${url}/api/chat`, headers });
const messages = [
  { id: `user-${chatId}`, role: 'user', parts: [{ type: 'text', text: process.env.TEXT }] },
];

const controller = new AbortController();
const first = await transport.sendMessages({
  chatId,
  messages,
  trigger: 'submit-message',
  messageId: undefined,
  abortSignal: controller.signal,
});
const beforeAbort = [];
const reader = first.getReader();
for (;;) {
  const { value, done } = await reader.read();
  if (done) break;
  beforeAbort.push(value);
  if (value.type === 'text-delta') break;
}
controller.abort(); // the tab closes: keepstream goes on generating
await reader.read().catch(() => null);

const resumed = await transport.reconnectToStream({ chatId });
if (resumed === null) throw new Error('reconnectToStream returned null while the answer ran');
const [raw, forMessage] = resumed.tee();
const chunksPromise = (async () => {
  const chunks = [];
  for await (const chunk of raw) chunks.push(chunk);
  return chunks;
})();
let message = null;
for await (const snapshot of readUIMessageStream({ stream: forMessage, terminateOnError: true })) {
  message = snapshot;
}
const resumeChunks = await chunksPromise;
const afterCompletion = await transport.reconnectToStream({ chatId });
console.log(
  JSON.stringify({ beforeAbort, resumeChunks, message, afterCompletionIsNull: afterCompletion === null }),
);
