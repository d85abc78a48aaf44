#!/usr/bin/env node
/**
 * Runs the Action once outside Auth0. The Python end-to-end tests use it.
 *
 *   echo '{"message": {...CloudEvent...}, "secrets": {"RELAY_URL": "...", ...}}' | node action/harness.js
 *
 * Exit 0 and print "ok" when the Action resolves. Exit 1 and print the Action's
 * error message on stderr when it throws (in Auth0 that would be a retry).
 * Exit 2 when stdin is not a JSON object.
 */
'use strict';

const { onExecuteEventStream } = require('./forward-to-relay.js');

/** An in-memory stand-in for Auth0's api.cache (get / set / delete). */
function memoryCache() {
  const entries = new Map();
  return {
    get: (key) => entries.get(key),
    set: (key, value, options = {}) => {
      entries.set(key, { value, expires_at: options.expires_at });
      return { type: 'success', key, value };
    },
    delete: (key) => {
      entries.delete(key);
      return { type: 'success', key };
    },
  };
}

// Write, then exit once the output is flushed. An idle keep-alive socket must
// not keep the process running.
function finish(stream, text, code) {
  stream.write(`${text}\n`, () => process.exit(code));
}

async function main() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  let input;
  try {
    input = JSON.parse(Buffer.concat(chunks).toString('utf8'));
  } catch (err) {
    return finish(process.stderr, `harness: stdin is not valid JSON: ${err.message}`, 2);
  }
  if (!input || typeof input !== 'object' || Array.isArray(input)) {
    return finish(process.stderr, 'harness: stdin must be a JSON object {"message": ..., "secrets": ...}', 2);
  }
  try {
    await onExecuteEventStream(
      { message: input.message, secrets: input.secrets || {} },
      { cache: memoryCache() },
    );
  } catch (err) {
    return finish(process.stderr, (err && err.message) || String(err), 1);
  }
  return finish(process.stdout, 'ok', 0);
}

main();
