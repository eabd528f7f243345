// The Durable Streams reference server (@durable-streams/server, pinned in package.json) on
// 127.0.0.1, for bench/bench_durable.py. Streams are served at any path, so
// http://127.0.0.1:PORT/v1/stream/<name> works as it does on keepstream.
//
//   node bench/node/serve.mjs PORT [--data-dir DIR] [--long-poll-timeout-ms MS]
//
// Without --data-dir the store is in memory; with it, file-backed (LMDB + append-only logs,
// fdatasync on every append). Prints one line "listening <url>" once it accepts requests.
//
// Install first with `npm install --prefix bench/node` (the versions in package-lock.json).
// Not `npm ci`: the lock was made where the registry had no darwin/win32 builds of the optional
// msgpackr-extract binaries, so `npm ci` reports it out of sync; `npm install` does not.
import { DurableStreamTestServer } from "@durable-streams/server"

const args = process.argv.slice(2)
const port = Number.parseInt(args[0] ?? "", 10)
if (!Number.isInteger(port) || port <= 0 || port > 65535) {
  console.error("usage: node serve.mjs PORT [--data-dir DIR] [--long-poll-timeout-ms MS]")
  process.exit(2)
}

function option(name) {
  const at = args.indexOf(name)
  return at >= 0 ? args[at + 1] : undefined
}

const dataDir = option("--data-dir")
const longPollTimeout = Number.parseInt(option("--long-poll-timeout-ms") ?? "20000", 10)

const server = new DurableStreamTestServer({
  port,
  host: "127.0.0.1",
  longPollTimeout,
  ...(dataDir ? { dataDir } : {}),
})

const url = await server.start()
console.log(`listening ${url} store=${dataDir ? "file" : "memory"} longPollTimeout=${longPollTimeout}`)

let stopping = false
for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, async () => {
    if (stopping) return
    stopping = true
    // A hung stop (open SSE responses) must not keep the process alive.
    setTimeout(() => process.exit(0), 2000).unref()
    await server.stop()
    process.exit(0)
  })
}
