// The official Durable Streams server conformance suite, pointed at CONFORMANCE_TEST_URL.
// (The package's own CLI finds no test files under vitest 4: upstream issue #284.)
import { runConformanceTests } from "@durable-streams/server-conformance-tests"

const baseUrl = process.env.CONFORMANCE_TEST_URL
if (!baseUrl) throw new Error("set CONFORMANCE_TEST_URL, e.g. http://127.0.0.1:8000")
runConformanceTests({ baseUrl })
