'use strict';

// Run with: node --test  (from action/). A real HTTP server on 127.0.0.1
// plays the relay.

const test = require('node:test');
const assert = require('node:assert/strict');
const http = require('node:http');
const path = require('node:path');
const { createHmac, randomBytes } = require('node:crypto');
const { spawn } = require('node:child_process');
const { Webhook } = require('standardwebhooks');

const { onExecuteEventStream, _internal } = require('./forward-to-relay.js');

const SECRET = `whsec_${randomBytes(32).toString('base64')}`;
const PREVIOUS = `whsec_${randomBytes(24).toString('base64')}`;

function cloudEvent(overrides = {}) {
  return {
    specversion: '1.0',
    id: 'evt_01JABCDEFghijkLMNOpq_-z',
    type: 'user.updated',
    source: 'urn:auth0:example.eu.auth0.com',
    time: '2025-06-01T12:34:56.789Z',
    a0tenant: 'example',
    a0stream: 'est_123',
    data: {
      object: {
        user_id: 'auth0|abc123',
        email: 'zoe@example.com',
        // Non-ASCII text checks that the UTF-8 bytes, not UTF-16 units, are signed.
        name: 'Zoë 山田 🚀',
        app_metadata: { plan: 'pro' },
        updated_at: '2025-06-01T12:34:56.000Z',
      },
    },
    ...overrides,
  };
}

/** Starts a stand-in relay. `respond(req, res, body)` answers; every request is recorded. */
async function startRelay(t, respond) {
  const requests = [];
  const server = http.createServer((req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const body = Buffer.concat(chunks);
      requests.push({ method: req.method, url: req.url, headers: req.headers, body });
      respond(req, res, body);
    });
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(
    () =>
      new Promise((resolve) => {
        server.closeAllConnections();
        server.close(resolve);
      }),
  );
  return { url: `http://127.0.0.1:${server.address().port}`, requests };
}

function reply(status, body, headers = {}) {
  return (req, res) => {
    res.writeHead(status, { 'content-type': 'application/json', ...headers });
    res.end(body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body));
  };
}

function run(secrets, message = cloudEvent()) {
  return onExecuteEventStream({ message, secrets }, { cache: {} });
}

test('signatureHeader reproduces the published Standard Webhooks vector', () => {
  const sig = _internal.signatureHeader(
    'msg_p5jXN8AQM9LWM0D4loKWxJek',
    1614265330,
    '{"test": 2432232314}',
    ['whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw'],
  );
  assert.equal(sig, 'v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=');
});

test('signatureHeader agrees with the standardwebhooks library for string and Buffer bodies', () => {
  const body = JSON.stringify(cloudEvent());
  const ts = 1700000000;
  const expected = new Webhook(SECRET).sign('evt_x', new Date(ts * 1000), body);
  assert.equal(_internal.signatureHeader('evt_x', ts, body, [SECRET]), expected);
  assert.equal(_internal.signatureHeader('evt_x', ts, Buffer.from(body, 'utf8'), [SECRET]), expected);
});

test('forwards the exact signed bytes to ${RELAY_URL}/events/action', async (t) => {
  const relay = await startRelay(t, reply(200, { status: 'applied' }));
  const message = cloudEvent();
  const before = Math.floor(Date.now() / 1000);

  const result = await run({ RELAY_URL: `${relay.url}/`, RELAY_SIGNING_SECRET: SECRET }, message);

  assert.equal(result, undefined);
  assert.equal(relay.requests.length, 1);
  const [req] = relay.requests;
  assert.equal(req.method, 'POST');
  assert.equal(req.url, '/events/action'); // trailing slash stripped, no "//"
  assert.equal(req.headers['content-type'], 'application/json');

  // The bytes received are JSON.stringify(event.message) as UTF-8...
  assert.ok(req.body.equals(Buffer.from(JSON.stringify(message), 'utf8')));
  assert.equal(Number(req.headers['content-length']), req.body.length);

  // ...the id is the CloudEvent id and the timestamp is now...
  assert.equal(req.headers['webhook-id'], message.id);
  assert.match(req.headers['webhook-timestamp'], /^\d+$/);
  const ts = Number(req.headers['webhook-timestamp']);
  assert.ok(ts >= before - 1 && ts <= Math.floor(Date.now() / 1000) + 1, `timestamp ${ts} is not now`);

  // ...and those very bytes are what was signed (computed independently here).
  const key = Buffer.from(SECRET.slice('whsec_'.length), 'base64');
  const mac = createHmac('sha256', key)
    .update(Buffer.concat([Buffer.from(`${req.headers['webhook-id']}.${ts}.`), req.body]))
    .digest('base64');
  assert.equal(req.headers['webhook-signature'], `v1,${mac}`);

  // The reference library accepts the request and gives back the original event.
  const verified = new Webhook(SECRET).verify(req.body.toString('utf8'), req.headers);
  assert.deepEqual(verified, message);
});

test('keeps a base path in RELAY_URL', async (t) => {
  const relay = await startRelay(t, reply(202, { status: 'queued' }));
  await run({ RELAY_URL: `${relay.url}/sync//`, RELAY_SIGNING_SECRET: SECRET });
  assert.deepEqual(relay.requests.map((r) => r.url), ['/sync/events/action']);
});

for (const status of [200, 202, 204]) {
  test(`resolves when the relay answers ${status}`, async (t) => {
    const relay = await startRelay(t, reply(status, status === 204 ? undefined : { status: 'ok' }));
    await assert.doesNotReject(run({ RELAY_URL: relay.url, RELAY_SIGNING_SECRET: SECRET }));
    assert.equal(relay.requests.length, 1);
  });
}

test('sends current and previous signatures during rotation, each verifying with its own secret', async (t) => {
  const relay = await startRelay(t, reply(200, {}));
  await run({
    RELAY_URL: relay.url,
    RELAY_SIGNING_SECRET: SECRET,
    RELAY_SIGNING_SECRET_PREVIOUS: PREVIOUS,
  });

  const [req] = relay.requests;
  const body = req.body.toString('utf8');
  const sigs = req.headers['webhook-signature'].split(' ');
  assert.equal(sigs.length, 2);
  assert.ok(sigs.every((s) => s.startsWith('v1,')));
  const only = (sig) => ({ ...req.headers, 'webhook-signature': sig });

  // Current first, then previous. Each one verifies with its own secret only.
  assert.doesNotThrow(() => new Webhook(SECRET).verify(body, only(sigs[0])));
  assert.doesNotThrow(() => new Webhook(PREVIOUS).verify(body, only(sigs[1])));
  assert.throws(() => new Webhook(SECRET).verify(body, only(sigs[1])), /No matching signature/);
  assert.throws(() => new Webhook(PREVIOUS).verify(body, only(sigs[0])), /No matching signature/);
  // A receiver that knows only one of the two keys accepts the full header.
  assert.doesNotThrow(() => new Webhook(SECRET).verify(body, req.headers));
  assert.doesNotThrow(() => new Webhook(PREVIOUS).verify(body, req.headers));
});

test('throws on 401 with the relay reason and without any secret value', async (t) => {
  const relay = await startRelay(t, reply(401, { error: 'signature mismatch' }));
  const err = await run({
    RELAY_URL: relay.url,
    RELAY_SIGNING_SECRET: SECRET,
    RELAY_SIGNING_SECRET_PREVIOUS: PREVIOUS,
  }).then(
    () => assert.fail('expected a rejection'),
    (e) => e,
  );
  assert.ok(err instanceof Error);
  assert.match(err.message, /HTTP 401/);
  assert.match(err.message, /signature mismatch/);
  assert.ok(!err.message.includes(SECRET.slice(6)) && !err.message.includes(PREVIOUS.slice(6)));
  assert.equal(relay.requests.length, 1);
});

test('throws on 503 and reports Retry-After', async (t) => {
  const relay = await startRelay(t, reply(503, { error: 'database unavailable' }, { 'retry-after': '5' }));
  await assert.rejects(run({ RELAY_URL: relay.url, RELAY_SIGNING_SECRET: SECRET }), {
    message: 'relay answered HTTP 503 (retry-after 5): database unavailable',
  });
});

test('throws on 500 with the first 200 characters of a non-JSON body', async (t) => {
  const text = 'x'.repeat(200) + 'TAIL-NOT-SHOWN';
  const relay = await startRelay(t, reply(500, text, { 'content-type': 'text/plain' }));
  await assert.rejects(run({ RELAY_URL: relay.url, RELAY_SIGNING_SECRET: SECRET }), (err) => {
    assert.equal(err.message, `relay answered HTTP 500: ${'x'.repeat(200)}`);
    return true;
  });
});

test('throws on 413 and on a redirect (not followed)', async (t) => {
  const big = await startRelay(t, reply(413, { error: 'body too large' }));
  await assert.rejects(run({ RELAY_URL: big.url, RELAY_SIGNING_SECRET: SECRET }), /HTTP 413: body too large/);

  const target = await startRelay(t, reply(200, {}));
  const moved = await startRelay(t, reply(308, '', { location: `${target.url}/events/action` }));
  await assert.rejects(run({ RELAY_URL: moved.url, RELAY_SIGNING_SECRET: SECRET }), /HTTP 308/);
  assert.equal(target.requests.length, 0);
});

test('throws "timed out after N ms" when the relay never answers', async (t) => {
  const relay = await startRelay(t, () => {}); // reads the request, never answers
  const started = Date.now();
  await assert.rejects(
    run({ RELAY_URL: relay.url, RELAY_SIGNING_SECRET: SECRET, RELAY_TIMEOUT_MS: '1000' }),
    { message: 'relay request timed out after 1000 ms' },
  );
  const elapsed = Date.now() - started;
  assert.ok(elapsed >= 900 && elapsed < 5000, `took ${elapsed} ms`);
  assert.equal(relay.requests.length, 1);
});

test('throws with the network error when the connection is refused', async () => {
  // Take a free port, then close it, so nothing is listening there.
  const server = http.createServer();
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));

  await assert.rejects(run({ RELAY_URL: `http://127.0.0.1:${port}`, RELAY_SIGNING_SECRET: SECRET }), (err) => {
    assert.match(err.message, /^relay request failed: .*ECONNREFUSED/);
    assert.ok(!err.message.includes(SECRET.slice(6)));
    return true;
  });
});

test('configuration errors name the secret, never show its value, and send nothing', async (t) => {
  const relay = await startRelay(t, reply(200, {}));
  const ok = { RELAY_URL: relay.url, RELAY_SIGNING_SECRET: SECRET };
  const short = `whsec_${randomBytes(16).toString('base64')}`;
  const noPrefix = randomBytes(32).toString('base64');
  const badChars = `whsec_${randomBytes(30).toString('base64url')}!`;
  const cases = [
    [{ ...ok, RELAY_URL: undefined }, 'RELAY_URL', null],
    [{ ...ok, RELAY_URL: 'not a url at all' }, 'RELAY_URL', 'not a url at all'],
    [{ ...ok, RELAY_URL: 'ftp://relay.internal/x' }, 'RELAY_URL', 'relay.internal'],
    [{ ...ok, RELAY_URL: `${relay.url}/?token=s3cr3t` }, 'RELAY_URL', 's3cr3t'],
    [{ ...ok, RELAY_SIGNING_SECRET: undefined }, 'RELAY_SIGNING_SECRET', null],
    [{ ...ok, RELAY_SIGNING_SECRET: noPrefix }, 'RELAY_SIGNING_SECRET must start with whsec_', noPrefix],
    [{ ...ok, RELAY_SIGNING_SECRET: short }, 'RELAY_SIGNING_SECRET must encode at least 24 bytes', short],
    [{ ...ok, RELAY_SIGNING_SECRET: badChars }, 'RELAY_SIGNING_SECRET must be whsec_', badChars],
    [{ ...ok, RELAY_SIGNING_SECRET: `${SECRET}\n` }, 'RELAY_SIGNING_SECRET', SECRET],
    // Wrongly padded: Node would decode it, but the relay's Python decoder rejects it.
    [{ ...ok, RELAY_SIGNING_SECRET: `whsec_${'A'.repeat(33)}=` }, 'RELAY_SIGNING_SECRET must be whsec_', null],
    [{ ...ok, RELAY_SIGNING_SECRET_PREVIOUS: short }, 'RELAY_SIGNING_SECRET_PREVIOUS', short],
    [{ ...ok, RELAY_TIMEOUT_MS: 'soon' }, 'RELAY_TIMEOUT_MS', null],
    [{ ...ok, RELAY_TIMEOUT_MS: '500' }, 'RELAY_TIMEOUT_MS', null],
    [{ ...ok, RELAY_TIMEOUT_MS: '20000' }, 'RELAY_TIMEOUT_MS', null],
  ];
  for (const [secrets, expected, value] of cases) {
    await assert.rejects(run(secrets), (err) => {
      assert.match(err.message, /^Action configuration error: /);
      assert.ok(err.message.includes(expected), `"${err.message}" should mention "${expected}"`);
      if (value) {
        assert.ok(!err.message.includes(value), `"${err.message}" leaks the value`);
        const b64 = value.replace(/^whsec_/, '').trim();
        assert.ok(!err.message.includes(b64), `"${err.message}" leaks the key`);
      }
      return true;
    });
  }
  assert.equal(relay.requests.length, 0);
});

test('refuses an event whose id is missing or contains "." or whitespace', async (t) => {
  const relay = await startRelay(t, reply(200, {}));
  const secrets = { RELAY_URL: relay.url, RELAY_SIGNING_SECRET: SECRET };
  for (const id of [undefined, '', 'evt.1', 'evt 1', 'evt\t1', 42]) {
    await assert.rejects(run(secrets, cloudEvent({ id })), /event\.message\.id/);
  }
  await assert.rejects(onExecuteEventStream({ secrets }, { cache: {} }), /event\.message\.id/);
  assert.equal(relay.requests.length, 0);
});

function runHarness(input) {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [path.join(__dirname, 'harness.js')], {
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stdout, stderr }));
    child.stdin.end(typeof input === 'string' ? input : JSON.stringify(input));
  });
}

test('harness.js prints ok and exits 0 on success, prints the error and exits 1 on failure', async (t) => {
  const good = await startRelay(t, reply(204));
  const message = cloudEvent();
  const okRun = await runHarness({ message, secrets: { RELAY_URL: good.url, RELAY_SIGNING_SECRET: SECRET } });
  assert.deepEqual(okRun, { code: 0, stdout: 'ok\n', stderr: '' });
  assert.ok(good.requests[0].body.equals(Buffer.from(JSON.stringify(message))));

  const bad = await startRelay(t, reply(401, { error: 'timestamp outside tolerance' }));
  const badRun = await runHarness({ message, secrets: { RELAY_URL: bad.url, RELAY_SIGNING_SECRET: SECRET } });
  assert.equal(badRun.code, 1);
  assert.equal(badRun.stdout, '');
  assert.equal(badRun.stderr, 'relay answered HTTP 401: timestamp outside tolerance\n');

  const junk = await runHarness('not json');
  assert.equal(junk.code, 2);
  assert.match(junk.stderr, /not valid JSON/);
});
