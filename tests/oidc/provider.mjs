// A real OpenID Provider for portcullis' tests: panva's certified `oidc-provider` 9.x, configured
// from one JSON document and bound to 127.0.0.1.
//
// Why this file exists: the openid-connect plugin must be tested against a conformant OP, not a
// mock, so every protocol answer (discovery, JWKS, authorization, token, userinfo, introspection,
// end_session) below comes from oidc-provider itself. This file only chooses its configuration.
//
// Usage:  node tests/oidc/provider.mjs '<settings JSON>'
//         (or the settings in the OIDC_PROVIDER_SETTINGS environment variable)
// When listening it prints exactly one line on stdout:
//         {"issuer":"http://127.0.0.1:PORT","port":PORT}
//
// Settings (every field optional):
//   port              TCP port on 127.0.0.1; 0 (default) lets the kernel pick one.
//   clients           [{ client_id, client_secret, redirect_uris, post_logout_redirect_uris,
//                        token_endpoint_auth_method, grant_types, response_types, scope,
//                        id_token_signed_response_alg }]
//   resources         { "<resource indicator>": { audience, format: "jwt" | "opaque", scope,
//                        alg: "RS256" | "ES256", ttl } }
//                     A token requested with `resource=<indicator>` is a JWT (verifiable with
//                     the JWKS) or an opaque one (introspectable). Tokens from the login flow
//                     carry no resource: they are opaque and may call userinfo.
//   ttl               { AccessToken, ClientCredentials, IdToken, RefreshToken, AuthorizationCode,
//                        Interaction, Session, Grant } in seconds, for short-lived test tokens.
//   scopes            extra scopes the OP accepts (openid, offline_access, email, profile and
//                     every resource's scopes are always accepted).
//   accounts          { "<login>": { extra claims } }; any login name is accepted by the dev
//                     login form, and these claims are added to that account's `profile` claims.
//   conform_id_token_claims  false puts scope claims into ID tokens too (default true).
//   pkce_required     true makes PKCE mandatory for every client (default: public clients only).
//
// TEST CONTROL (not part of the OP, only reachable on 127.0.0.1):
//   POST /__test/rotate-keys  body {"keep_old": true|false}
//     Generates a new RS256 and a new ES256 signing key and makes them current (they sign every
//     token from now on). With keep_old (default true) the previous keys stay published in the
//     JWKS so tokens signed earlier still verify; with false they are dropped. Sessions, grants,
//     codes and tokens survive because the provider keeps them in one in-process store.
//     Answers {"kids": [...current kids, newest first], "jwks": {...public JWKS}}.
//   GET /__test/keys  answers the same document without changing anything.
//   GET /__test/requests  answers {"<path>": count} of the OP requests served so far (test
//     control excluded), so a test can prove that a relying party answered from its cache.
// Environment: OIDC_PROVIDER_EXIT_ON_STDIN_EOF=1 makes the process exit when its stdin closes.
// Rotation works through the public API only: a new Provider instance is built with the new
// key set and takes over request handling; the OP implementation itself is not altered.

import { createServer } from 'node:http';
import { createPrivateKey, generateKeyPairSync, randomBytes } from 'node:crypto';

import Provider from 'oidc-provider';

// stdout carries only the one ready line; oidc-provider's notices go to stderr with its warnings.
console.log = console.error;
console.info = console.error;

const raw = process.argv[2] ?? process.env.OIDC_PROVIDER_SETTINGS ?? '{}';
let settings;
try {
  settings = JSON.parse(raw);
} catch (err) {
  console.error(`provider.mjs: settings are not JSON: ${err.message}`);
  process.exit(2);
}

const STANDARD_PROFILE_CLAIMS = [
  'name', 'family_name', 'given_name', 'middle_name', 'nickname', 'preferred_username',
  'profile', 'picture', 'website', 'gender', 'birthdate', 'zoneinfo', 'locale', 'updated_at',
];

const accounts = settings.accounts ?? {};
const resources = settings.resources ?? {};
const extraProfileClaims = new Set();
for (const claims of Object.values(accounts)) {
  for (const name of Object.keys(claims)) {
    if (!STANDARD_PROFILE_CLAIMS.includes(name) && !['sub', 'email', 'email_verified'].includes(name)) {
      extraProfileClaims.add(name);
    }
  }
}

const scopes = new Set(['openid', 'offline_access', 'email', 'profile', ...(settings.scopes ?? [])]);
for (const server of Object.values(resources)) {
  for (const scope of (server.scope ?? '').split(' ').filter(Boolean)) scopes.add(scope);
}

// A new private key as a JWK. Generated as PEM and read back rather than exported from the
// KeyObject generateKeyPairSync returns: on Node 20, a garbage collection during that export
// can finalize the finished key-generation job, whose destructor takes the lock the export
// holds, and the process hangs for good (seen as an OP that never printed its ready line;
// `generateKeyPairSync('ec', ...).privateKey.export({ format: 'jwk' })` in a loop hangs
// within a few thousand keys, this form did not in 20 000).
function privateJwk(type, options) {
  const { privateKey } = generateKeyPairSync(type, {
    ...options,
    publicKeyEncoding: { type: 'spki', format: 'pem' },
    privateKeyEncoding: { type: 'pkcs8', format: 'pem' },
  });
  return createPrivateKey(privateKey).export({ format: 'jwk' });
}

function newSigningKeys() {
  const stamp = `${Date.now().toString(36)}-${randomBytes(3).toString('hex')}`;
  const rsa = privateJwk('rsa', { modulusLength: 2048 });
  const ec = privateJwk('ec', { namedCurve: 'P-256' });
  return [
    { ...rsa, kid: `rs256-${stamp}`, alg: 'RS256', use: 'sig' },
    { ...ec, kid: `es256-${stamp}`, alg: 'ES256', use: 'sig' },
  ];
}

function publicJwk({ kty, kid, alg, use, n, e, crv, x, y }) {
  return Object.fromEntries(
    Object.entries({ kty, kid, alg, use, n, e, crv, x, y }).filter(([, v]) => v !== undefined),
  );
}

function clientMetadata(client) {
  const metadata = { ...client };
  metadata.grant_types ??= ['authorization_code', 'refresh_token', 'client_credentials'];
  metadata.response_types ??= metadata.grant_types.includes('authorization_code') ? ['code'] : [];
  metadata.redirect_uris ??= [];
  return metadata;
}

function ttlSettings() {
  const ttl = {};
  for (const [name, seconds] of Object.entries(settings.ttl ?? {})) {
    if (!Number.isInteger(seconds) || seconds <= 0) {
      throw new Error(`ttl.${name} must be a positive integer number of seconds`);
    }
    ttl[name] = seconds;
  }
  return ttl;
}

function errorPage(ctx, out) {
  ctx.type = 'html';
  const escape = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
  ctx.body = `<!DOCTYPE html><html><head><title>error</title></head><body><pre id="error">${escape(JSON.stringify(out))}</pre></body></html>`;
}

// The provider's state (sessions, interactions, grants, codes, tokens) lives in this one
// process-wide store, through oidc-provider's documented adapter interface, so that it survives
// key rotations (each rotation builds a new Provider instance, and the built-in development
// adapter keeps one store per instance).
const store = new Map(); // "Model:id" -> { payload, expiresAt }
const grantMembers = new Map(); // grantId -> Set of "Model:id"
const sessionByUid = new Map(); // uid -> session id
const byUserCode = new Map(); // userCode -> id

function live(key) {
  const entry = store.get(key);
  if (!entry) return undefined;
  if (entry.expiresAt <= Date.now()) {
    store.delete(key);
    return undefined;
  }
  return entry.payload;
}

class SharedMemoryAdapter {
  constructor(model) {
    this.model = model;
  }

  key(id) {
    return `${this.model}:${id}`;
  }

  async upsert(id, payload, expiresIn) {
    const key = this.key(id);
    const expiresAt = typeof expiresIn === 'number' ? Date.now() + expiresIn * 1000 : Infinity;
    store.set(key, { payload, expiresAt });
    if (this.model === 'Session' && payload.uid) sessionByUid.set(payload.uid, id);
    if (payload.userCode) byUserCode.set(payload.userCode, id);
    if (payload.grantId) {
      if (!grantMembers.has(payload.grantId)) grantMembers.set(payload.grantId, new Set());
      grantMembers.get(payload.grantId).add(key);
    }
  }

  async find(id) {
    return live(this.key(id));
  }

  async findByUid(uid) {
    const id = sessionByUid.get(uid);
    return id === undefined ? undefined : this.find(id);
  }

  async findByUserCode(userCode) {
    const id = byUserCode.get(userCode);
    return id === undefined ? undefined : this.find(id);
  }

  async consume(id) {
    const payload = live(this.key(id));
    if (payload) payload.consumed = Math.floor(Date.now() / 1000);
  }

  async destroy(id) {
    store.delete(this.key(id));
  }

  async revokeByGrantId(grantId) {
    for (const key of grantMembers.get(grantId) ?? []) store.delete(key);
    grantMembers.delete(grantId);
  }
}

// One cookie signing secret for the whole process so that OP cookies stay valid across key
// rotations (each rotation builds a new Provider instance).
const cookieKeys = [randomBytes(32).toString('base64url')];

function buildProvider(issuer, jwks) {
  const configuration = {
    adapter: SharedMemoryAdapter,
    clients: (settings.clients ?? []).map(clientMetadata),
    jwks,
    cookies: { keys: cookieKeys },
    scopes: [...scopes],
    claims: {
      openid: ['sub'],
      email: ['email', 'email_verified'],
      profile: [...STANDARD_PROFILE_CLAIMS, ...extraProfileClaims],
    },
    conformIdTokenClaims: settings.conform_id_token_claims ?? true,
    pkce: {
      required: (_ctx, client) => settings.pkce_required === true || client.clientAuthMethod === 'none',
    },
    ttl: ttlSettings(),
    async findAccount(_ctx, sub) {
      return {
        accountId: sub,
        async claims() {
          return {
            sub,
            email: `${sub}@example.test`,
            email_verified: true,
            name: `Test User ${sub}`,
            preferred_username: sub,
            ...(accounts[sub] ?? {}),
          };
        },
      };
    },
    // A refresh token whenever the client may use the refresh_token grant, so a relying party
    // does not have to force `prompt=consent` to get one.
    async issueRefreshToken(_ctx, client) {
      return client.grantTypeAllowed('refresh_token');
    },
    renderError: errorPage,
    features: {
      devInteractions: { enabled: true },
      introspection: {
        enabled: true,
        async allowedPolicy(_ctx, client, token) {
          return !(client.clientAuthMethod === 'none' && token.clientId !== client.clientId);
        },
      },
      revocation: { enabled: true },
      clientCredentials: { enabled: true },
      rpInitiatedLogout: {
        enabled: true,
        async logoutSource(ctx, form) {
          ctx.body = `<!DOCTYPE html><html><head><title>Logout</title></head><body>${form}<button type="submit" form="op.logoutForm" name="logout" value="yes">Sign out</button></body></html>`;
        },
        async postLogoutSuccessSource(ctx) {
          ctx.body = '<!DOCTYPE html><html><head><title>Signed out</title></head><body>signed out</body></html>';
        },
      },
      resourceIndicators: {
        enabled: true,
        async defaultResource() {
          return undefined;
        },
        async useGrantedResource() {
          return false;
        },
        async getResourceServerInfo(_ctx, indicator) {
          const server = resources[indicator];
          if (!server) {
            throw new Provider.errors.InvalidTarget(`unknown resource ${indicator}`);
          }
          const info = {
            scope: server.scope ?? '',
            audience: server.audience ?? indicator,
            accessTokenFormat: server.format ?? 'jwt',
          };
          if (server.ttl !== undefined) info.accessTokenTTL = server.ttl;
          if (info.accessTokenFormat === 'jwt') {
            info.jwt = { sign: { alg: server.alg ?? 'RS256' } };
          }
          return info;
        },
      },
    },
  };
  return new Provider(issuer, configuration);
}

let keys = newSigningKeys();
let provider;
let handle;

function keysDocument() {
  return {
    kids: keys.slice(0, 2).map((k) => k.kid),
    jwks: { keys: keys.map(publicJwk) },
  };
}

async function readJson(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  const text = Buffer.concat(chunks).toString('utf8').trim();
  return text ? JSON.parse(text) : {};
}

async function testControl(req, res, issuer) {
  const send = (status, body) => {
    res.writeHead(status, { 'content-type': 'application/json' });
    res.end(JSON.stringify(body));
  };
  const path = new URL(req.url, issuer).pathname;
  if (path === '/__test/requests' && req.method === 'GET') {
    return send(200, Object.fromEntries(requestCounts));
  }
  if (path === '/__test/keys' && req.method === 'GET') {
    return send(200, keysDocument());
  }
  if (path === '/__test/rotate-keys' && req.method === 'POST') {
    let body;
    try {
      body = await readJson(req);
    } catch (err) {
      return send(400, { error: `body is not JSON: ${err.message}` });
    }
    const fresh = newSigningKeys();
    keys = body.keep_old === false ? fresh : [...fresh, ...keys];
    provider = buildProvider(issuer, { keys });
    handle = provider.callback();
    return send(200, keysDocument());
  }
  return send(404, { error: `no test-control route ${req.method} ${path}` });
}

const requestCounts = new Map(); // path -> number of OP requests served

const server = createServer((req, res) => {
  if (!req.url.startsWith('/__test/')) {
    const path = new URL(req.url, server.issuer).pathname;
    requestCounts.set(path, (requestCounts.get(path) ?? 0) + 1);
  }
  if (req.url.startsWith('/__test/')) {
    testControl(req, res, server.issuer).catch((err) => {
      res.writeHead(500, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ error: String(err) }));
    });
    return;
  }
  handle(req, res);
});

server.listen(settings.port ?? 0, '127.0.0.1', () => {
  const { port } = server.address();
  server.issuer = `http://127.0.0.1:${port}`;
  try {
    provider = buildProvider(server.issuer, { keys });
    handle = provider.callback();
  } catch (err) {
    console.error(`provider.mjs: invalid settings: ${err.message}`);
    process.exit(2);
  }
  process.stdout.write(`${JSON.stringify({ issuer: server.issuer, port })}\n`);
});

const stop = () => {
  server.close(() => process.exit(0));
  server.closeAllConnections();
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
// The Rust test helper holds our stdin open: if the test process dies without killing us, the
// pipe closes and we leave with it instead of lingering on the machine.
if (process.env.OIDC_PROVIDER_EXIT_ON_STDIN_EOF === '1') {
  process.stdin.on('end', stop);
  process.stdin.on('error', stop);
  process.stdin.resume();
}
