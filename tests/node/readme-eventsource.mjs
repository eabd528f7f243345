// Runs the README's EventSource snippet as written (SNIPPET), with the real `eventsource`
// package standing in for the browser's, and prints what it rendered as one JSON line.
import { EventSource } from 'eventsource';

const output = { textContent: '', dataset: {} };
const AsyncFunction = (async () => {}).constructor;
const snippet = new AsyncFunction(
  'API', 'apiKey', 'generationId', 'output', 'EventSource',
  `${process.env.SNIPPET}\nreturn source;`,
);
const source = await snippet(
  process.env.API, process.env.API_KEY, process.env.GENERATION_ID, output, EventSource,
);
const started = Date.now();
while (!output.dataset.status && Date.now() - started < 20000) {
  await new Promise((resolve) => setTimeout(resolve, 20));
}
source.close();
console.log(JSON.stringify({ text: output.textContent, status: output.dataset.status ?? null }));
