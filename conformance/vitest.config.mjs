// Only the wrapper file; vitest's default 5 s test timeout is what the suite expects.
export default { test: { include: ["conformance.test.mjs"] } }
