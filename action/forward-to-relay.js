/**
 * Auth0 Event Stream Action: forward each event to the relay.
 *
 * The CloudEvent in `event.message` is sent unchanged to
 * POST ${RELAY_URL}/events/action. It is signed with Standard Webhooks v1
 * (https://www.standardwebhooks.com/): an HMAC-SHA256 over
 * "<webhook-id>.<webhook-timestamp>.<body>".
 *
 * Action secrets:
 *   RELAY_URL                      required, http(s) base URL of the relay
 *   RELAY_SIGNING_SECRET           required, "whsec_" + base64 of >= 24 random bytes
 *   RELAY_SIGNING_SECRET_PREVIOUS  optional; while it is set, both keys sign (rotation)
 *   RELAY_TIMEOUT_MS               optional, 1000..15000, default 8000
 *
 * Plain CommonJS with no npm dependencies, so it can be pasted into the
 * Auth0 editor. It runs on Node 20 and Node 22.
 */
'use strict';

const { createHmac } = require('node:crypto');

const PREFIX = 'whsec_';
const MIN_KEY_BYTES = 24;
const DEFAULT_TIMEOUT_MS = 8000;
const MIN_TIMEOUT_MS = 1000;
const MAX_TIMEOUT_MS = 15000;
const BASE64 = /^[A-Za-z0-9+/]+={0,2}$/;

// Auth0 keeps module state between executions on the same instance, so each
// secret is decoded and checked only once. The cache is keyed by the secret
// string, so when a secret is changed the new key is used straight away.
// Only valid secrets go into the cache.
const keyCache = new Map();

function configError(message) {
  return new Error(`Action configuration error: ${message}`);
}

/** Returns the HMAC key bytes for `secret`. Errors name the secret, never show its value. */
function hmacKey(secret, name = 'signing secret') {
  const cached = keyCache.get(secret);
  if (cached) return cached;
  if (typeof secret !== 'string' || secret === '') throw configError(`${name} is not set`);
  if (!secret.startsWith(PREFIX)) throw configError(`${name} must start with ${PREFIX}`);
  const b64 = secret.slice(PREFIX.length);
  // Check the text ourselves. Buffer.from(..., 'base64') silently skips unknown
  // characters and accepts bad padding, which the relay's Python decoder rejects.
  // Padding may be left out, as the reference libraries allow.
  const badLength = b64.includes('=') ? b64.length % 4 !== 0 : b64.length % 4 === 1;
  if (!BASE64.test(b64) || badLength) {
    throw configError(`${name} must be ${PREFIX} followed by standard base64 (no spaces or newlines)`);
  }
  const key = Buffer.from(b64, 'base64');
  if (key.length < MIN_KEY_BYTES) {
    throw configError(`${name} must encode at least ${MIN_KEY_BYTES} bytes (got ${key.length})`);
  }
  if (keyCache.size >= 8) keyCache.clear(); // keeps the cache small if secrets change often
  keyCache.set(secret, key);
  return key;
}

/**
 * The value of the `webhook-signature` header: one "v1,<base64 MAC>" for each
 * secret, in the order given, separated by spaces. `body` is a string (which
 * is hashed as UTF-8) or a Buffer, and must be exactly what is sent.
 */
function signatureHeader(id, timestamp, body, secrets) {
  return secrets
    .map((secret) => {
      const mac = createHmac('sha256', hmacKey(secret))
        .update(`${id}.${timestamp}.`, 'utf8')
        .update(body)
        .digest('base64');
      return `v1,${mac}`;
    })
    .join(' ');
}

function readConfig(secrets = {}) {
  const rawUrl = secrets.RELAY_URL;
  if (!rawUrl) throw configError('RELAY_URL is not set');
  let url;
  try {
    url = new URL(rawUrl);
  } catch {
    throw configError('RELAY_URL is not a valid URL');
  }
  if (url.protocol !== 'https:' && url.protocol !== 'http:') {
    throw configError('RELAY_URL must start with https:// or http://');
  }
  if (url.search || url.hash || url.username || url.password) {
    throw configError('RELAY_URL must not contain a query, fragment or credentials');
  }

  const current = secrets.RELAY_SIGNING_SECRET;
  const previous = secrets.RELAY_SIGNING_SECRET_PREVIOUS;
  hmacKey(current, 'RELAY_SIGNING_SECRET');
  const signingSecrets = [current];
  if (previous) {
    hmacKey(previous, 'RELAY_SIGNING_SECRET_PREVIOUS');
    if (previous !== current) signingSecrets.push(previous);
  }

  let timeoutMs = DEFAULT_TIMEOUT_MS;
  const rawTimeout = secrets.RELAY_TIMEOUT_MS;
  if (rawTimeout !== undefined && rawTimeout !== '') {
    timeoutMs = /^\d+$/.test(String(rawTimeout)) ? Number(rawTimeout) : NaN;
    if (!(timeoutMs >= MIN_TIMEOUT_MS && timeoutMs <= MAX_TIMEOUT_MS)) {
      throw configError(`RELAY_TIMEOUT_MS must be a whole number from ${MIN_TIMEOUT_MS} to ${MAX_TIMEOUT_MS}`);
    }
  }

  // A base path such as https://host/sync/ is kept; trailing slashes are dropped.
  const endpoint = `${url.href.replace(/\/+$/, '')}/events/action`;
  return { endpoint, signingSecrets, timeoutMs };
}

/** Removes the signing secrets from text that came from outside (relay body, network errors). */
function redact(text, secrets) {
  let out = String(text).replace(/\s+/g, ' ').trim();
  for (const s of secrets) out = out.split(s).join('[redacted]');
  return out;
}

function relayReason(text) {
  try {
    const parsed = JSON.parse(text);
    if (parsed && typeof parsed.error === 'string') return parsed.error;
  } catch {
    // The body is not JSON: fall back to the raw text.
  }
  return text.slice(0, 200);
}

exports.onExecuteEventStream = async (event, api) => {
  const { endpoint, signingSecrets, timeoutMs } = readConfig(event.secrets);

  const message = event.message;
  const id = message && message.id;
  // The id goes into the signed "id.timestamp." prefix, so a '.' would make
  // that prefix ambiguous. Whitespace would not survive as a header value.
  if (typeof id !== 'string' || id === '' || /[.\s]/.test(id)) {
    throw new Error('event.message.id is missing or contains "." or whitespace; refusing to forward');
  }

  // Serialise once, then sign and send the same bytes. JSON.stringify always
  // gives well-formed text (lone surrogates are escaped), so the UTF-8 bytes
  // are well defined.
  const body = Buffer.from(JSON.stringify(message), 'utf8');
  const timestamp = Math.floor(Date.now() / 1000);

  let response;
  let text = '';
  try {
    response = await fetch(endpoint, {
      method: 'POST',
      headers: {
        'content-type': 'application/json',
        'webhook-id': id,
        'webhook-timestamp': String(timestamp),
        'webhook-signature': signatureHeader(id, timestamp, body, signingSecrets),
      },
      body,
      // A redirect means RELAY_URL is wrong (for example http -> https). We
      // want that reported as a failure, not followed without anyone knowing.
      redirect: 'manual',
      signal: AbortSignal.timeout(timeoutMs),
    });
    // The 2xx body is not needed, but reading it lets the connection be reused.
    // Once the relay has answered 2xx the event is committed, so an error while
    // reading the body must not turn into a failure.
    text = await response.text().catch(() => '');
  } catch (err) {
    if (err && err.name === 'TimeoutError') {
      throw new Error(`relay request timed out after ${timeoutMs} ms`);
    }
    // undici reports "fetch failed" and puts the real reason (ECONNREFUSED,
    // DNS, TLS) in `cause`. For a dual-stack connect it is an AggregateError
    // with an empty message.
    const cause = (err && err.cause) || err;
    const detail = (cause && (cause.message || cause.code)) || (err && err.message) || String(err);
    throw new Error(`relay request failed: ${redact(detail, signingSecrets)}`);
  }

  if (response.ok) return;

  // We throw instead of logging and returning. If the Action returns, Auth0
  // marks the event as delivered and it is lost. If it throws, Auth0 retries
  // and, once the retries are used up, puts the event in the dead-letter queue,
  // where it can be seen and redelivered.
  const retryAfter = response.headers.get('retry-after');
  const reason = redact(relayReason(text), signingSecrets);
  throw new Error(
    `relay answered HTTP ${response.status}` +
      (retryAfter ? ` (retry-after ${redact(retryAfter, signingSecrets)})` : '') +
      (reason ? `: ${reason}` : ''),
  );
};

// For tests only. The Action's public contract is onExecuteEventStream.
exports._internal = { signatureHeader, readConfig };
