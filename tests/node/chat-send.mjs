// Sends one request with the real DefaultChatTransport and prints every chunk it yields and
// the assistant message readUIMessageStream assembles from them.
// Env: KEEPSTREAM_URL, CHAT_ID, TEXT (the user message), optional API_KEY, TRIGGER
// (submit-message | regenerate-message), MESSAGES (JSON UIMessages, instead of TEXT),
// MESSAGE_ID, STOP_AFTER_DELTA=1 (POST /api/chat/{id}/stop after the first text delta).
import { DefaultChatTransport, readUIMessageStream } from 'ai';

const url = process.env.KEEPSTREAM_URL;
const chatId = process.env.CHAT_ID;
const headers = process.env.API_KEY ? { Authorization: `Bearer ${process.env.API_KEY}` } : {};
const transport = new DefaultChatTransport({ api: `${url}/api/chat`, headers });
const messages = process.env.MESSAGES
  ? JSON.parse(process.env.MESSAGES)
  : [{ id: `user-${chatId}`, role: 'user', parts: [{ type: 'text', text: process.env.TEXT }] }];

const stream = await transport.sendMessages({
  chatId,
  messages,
  trigger: process.env.TRIGGER ?? 'submit-message',
  messageId: process.env.MESSAGE_ID || undefined,
  abortSignal: undefined,
});
const [raw, forMessage] = stream.tee();
const assembled = (async () => {
  let last = null;
  const errors = [];
  for await (const message of readUIMessageStream({
    stream: forMessage,
    onError: (error) => errors.push(String(error?.message ?? error)),
  })) {
    last = message;
  }
  return { message: last, errors };
})();

const chunks = [];
let stopStatus = null;
for await (const chunk of raw) {
  chunks.push(chunk);
  if (process.env.STOP_AFTER_DELTA && chunk.type === 'text-delta' && stopStatus === null) {
    const response = await fetch(`${url}/api/chat/${encodeURIComponent(chatId)}/stop`, {
      method: 'POST',
      headers,
    });
    stopStatus = response.status;
  }
}
const { message, errors } = await assembled;
console.log(JSON.stringify({ chunks, message, errors, stopStatus }));
