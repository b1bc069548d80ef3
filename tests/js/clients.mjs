// fal's JavaScript clients, unmodified, against a live lcm-farm (run by tests/test_js_clients.py).
//
//   node clients.mjs client|serverless
//   node --experimental-websocket clients.mjs realtime-client|realtime-serverless
//
// Environment: FARM_URL (https://127.0.0.1:PORT), FAL_KEY, APP, TINY and IDLE (JSON inputs),
// SKETCH (a 64x96 PNG, base64), NODE_EXTRA_CA_CERTS (the test CA). Prints one JSON object with what each
// call returned.
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const { FARM_URL, FAL_KEY, APP } = process.env;
const TINY = JSON.parse(process.env.TINY);
const IDLE = JSON.parse(process.env.IDLE);
const SKETCH = Buffer.from(process.env.SKETCH ?? "", "base64");
const out = {};

async function attempt(name, fn) {
  try {
    out[name] = await fn();
  } catch (error) {
    out[name] = { error: String(error?.message ?? error), status: error?.status, body: error?.body };
  }
}

async function untilCompleted(getStatus) {
  const seen = [];
  for (let i = 0; i < 600; i++) {
    const status = await getStatus();
    seen.push(status.status);
    if (status.status === "COMPLETED") return { seen, last: status };
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error(`not COMPLETED after 600 polls: ${seen.slice(-3)}`);
}

async function exercise(fal, { hasStream }) {
  await attempt("subscribe", async () => {
    const updates = [];
    const enqueued = [];
    const result = await fal.subscribe(APP, {
      input: { ...TINY, seed: 11 },
      logs: true,
      pollInterval: 50,
      onEnqueue: (id) => enqueued.push(id),
      onQueueUpdate: (update) => updates.push(update.status),
    });
    return { result: result.data ?? result, enqueued, updates };
  });
  await attempt("queue", async () => {
    const submitted = await fal.queue.submit(APP, { input: { ...TINY, seed: 12, num_images: 2 } });
    const requestId = submitted.request_id;
    const { seen, last } = await untilCompleted(() => fal.queue.status(APP, { requestId, logs: true }));
    const result = await fal.queue.result(APP, { requestId });
    return { requestId, seen, logs: last.logs, result: result.data ?? result };
  });
  await attempt("cancel", async () => {
    const { request_id: requestId } = await fal.queue.submit(APP, { input: IDLE });
    const before = await fal.queue.status(APP, { requestId });
    await fal.queue.cancel(APP, { requestId });
    const after = await fal.queue.status(APP, { requestId });
    return { before: before.status, after: after.status, error_type: after.error_type };
  });
  await attempt("run", async () => {
    const result = await fal.run(APP, { input: { ...TINY, seed: 13 } });
    return result.data ?? result;
  });
  if (hasStream) {
    await attempt("stream", async () => {
      const stream = await fal.stream(APP, { input: { ...TINY, seed: 14 } });
      const events = [];
      for await (const event of stream) events.push(event);
      return { events, done: await stream.done() };
    });
  }
  await attempt("invalid", async () => {
    await fal.subscribe(APP, { input: { ...TINY, num_inference_steps: 0 } });
    return "accepted";
  });
  await attempt("upload", async () => {
    const bytes = new Uint8Array([0, 1, 2, 3, 250, 251, 252, 253]);
    return await fal.storage.upload(new Blob([bytes], { type: "application/octet-stream" }));
  });
}

// fal's clients open `new WebSocket("wss://fal.run/…")`, never through the middleware: these
// lines point that socket at the farm (the README shows them)
const sockets = []; // every socket the client opened (not in the README: the test checks they close)
function pointWebSocketsAtTheFarm() {
  const farm = new URL(FARM_URL);
  const Native = globalThis.WebSocket;
  globalThis.WebSocket = class extends Native {
    constructor(url, protocols) {
      const target = new URL(url);
      if (target.host === "fal.run") url = `wss://${farm.host}${target.pathname}${target.search}`;
      super(url, protocols);
      sockets.push(this);
    }
  };
}

// after connection.close(): the close handshake with the farm, bounded (10 s); the close codes
async function socketsClosed() {
  const deadline = Date.now() + 10000;
  while (sockets.some((ws) => ws.readyState !== WebSocket.CLOSED) && Date.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  return sockets.map((ws) => (ws.readyState === WebSocket.CLOSED ? "closed" : `readyState ${ws.readyState}`));
}

function summary(result) {
  const images = (result.images ?? []).map((image) => ({
    width: image.width,
    height: image.height,
    content_type: image.content_type,
    size: image.content?.length ?? 0,
    head: Array.from((image.content ?? []).slice(0, 4)),
  }));
  return { request_id: result.request_id, seed: result.seed, prompt: result.prompt, images, timings: result.timings };
}

async function realtime(fal) {
  const results = [];
  const errors = [];
  let wake = () => {};
  const connection = fal.realtime.connect(APP, {
    throttleInterval: 0,
    onResult: (result) => {
      results.push(summary(result));
      wake();
    },
    onError: (error) => {
      errors.push({ message: String(error?.message ?? error), status: error?.status, body: error?.body });
      wake();
    },
  });
  const next = (count) =>
    new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no answer within 60 s (${count})`)), 60000);
      wake = () => {
        if (results.length + errors.length >= count) {
          clearTimeout(timer);
          resolve();
        }
      };
      wake();
    });
  const sizes = [[64, 64], [96, 64], [64, 128]];
  for (const [i, [width, height]] of sizes.entries()) {
    connection.send({ ...TINY, image_size: { width, height }, seed: 20 + i, request_id: `js-${i}` });
    await next(i + 1);
  }
  connection.send({ ...TINY, num_inference_steps: 0, request_id: "js-bad" });
  await next(sizes.length + 1);
  connection.send({ ...TINY, seed: 30, request_id: "js-after-bad" });
  await next(sizes.length + 2);
  const answered = errors.length;
  connection.close();
  // both clients call ws.close() without a code; the farm echoes that close frame as RFC 6455
  // says, so the event's code is 1005 (no status) and they report it through onError
  const sockets = await socketsClosed();
  return { results, errors: errors.slice(0, answered), afterClose: errors.slice(answered), sockets };
}

// fal's sketch demo (fal-js apps/demo-nextjs-app-router/app/realtime/page.tsx) at image-to-image: each
// stroke sends the canvas as raw `image_bytes` (a Uint8Array: msgpack bin), throttled to 128 ms (the
// client's default), and draws `result.images[0].content`
async function sketch(fal) {
  const results = [];
  const errors = [];
  let wake = () => {};
  const connection = fal.realtime.connect(`${APP}/image-to-image`, {
    onResult: (result) => {
      results.push(summary(result));
      wake();
    },
    onError: (error) => {
      errors.push({ message: String(error?.message ?? error), status: error?.status, body: error?.body });
      wake();
    },
  });
  const until = (what, done) =>
    new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no ${what} within 60 s`)), 60000);
      wake = () => {
        if (done()) {
          clearTimeout(timer);
          resolve();
        }
      };
      wake();
    });
  const { image_size, ...defaults } = TINY; // no image_size: the sketch's own size
  const frame = { ...defaults, num_inference_steps: 4, strength: 0.5, seed: 6252023 };
  for (let stroke = 0; stroke < 3; stroke++) {
    // strokes faster than the throttle: the first and the latest are sent
    connection.send({ ...frame, prompt: `a moon in the night sky ${stroke}`, image_bytes: new Uint8Array(SKETCH) });
  }
  await until("answer to the latest stroke", () => results.some((r) => r.prompt?.endsWith(" 2")) || errors.length);
  connection.send({ ...frame, image_bytes: new TextEncoder().encode("no image at all") });
  await until("error", () => errors.length > 0);
  connection.close();
  await socketsClosed();
  return { results, errors };
}

const mode = process.argv[2];
if (mode === "client") {
  // @fal-ai/client 1.x: fal's proxy convention, nothing else changed
  const { createFalClient } = require("@fal-ai/client");
  const fal = createFalClient({ credentials: FAL_KEY, proxyUrl: { url: `${FARM_URL}/fal/proxy`, when: "always" } });
  await exercise(fal, { hasStream: true });
  await attempt("token", async () => {
    // what fal.realtime.connect() asks for first: POST rest.fal.ai/tokens/, through the proxy
    // (its own module, loaded by path: the package exports only its entry point)
    const src = new URL("node_modules/@fal-ai/client/src/", import.meta.url).pathname;
    const { getTemporaryAuthToken } = require(`${src}auth.js`);
    const { createConfig } = require(`${src}config.js`);
    const config = createConfig({ credentials: FAL_KEY, proxyUrl: { url: `${FARM_URL}/fal/proxy`, when: "always" } });
    return await getTemporaryAuthToken(APP, config);
  });
  await attempt("imageToImage", async () => {
    const { image_size, ...defaults } = TINY;
    const input = { ...defaults, image_url: `data:image/png;base64,${SKETCH.toString("base64")}`, seed: 16 };
    const { request_id: requestId } = await fal.queue.submit(`${APP}/image-to-image`, { input });
    const { seen } = await untilCompleted(() => fal.queue.status(`${APP}/image-to-image`, { requestId }));
    const result = await fal.queue.result(`${APP}/image-to-image`, { requestId });
    return { requestId, seen, result: result.data ?? result };
  });
} else if (mode === "serverless") {
  // @fal-ai/serverless-client 0.15 (the client fal's model page shows): a requestMiddleware
  // that points fal's hosts at the farm
  const fal = require("@fal-ai/serverless-client");
  const hosts = { "queue.fal.run": "/queue", "fal.run": "/run", "rest.alpha.fal.ai": "", "rest.fal.ai": "" };
  fal.config({
    credentials: FAL_KEY,
    requestMiddleware: async (request) => {
      const url = new URL(request.url);
      const prefix = hosts[url.host];
      return prefix === undefined ? request : { ...request, url: `${FARM_URL}${prefix}${url.pathname}${url.search}` };
    },
  });
  await exercise(fal, { hasStream: true });
} else if (mode === "realtime-client") {
  pointWebSocketsAtTheFarm();
  const { createFalClient } = require("@fal-ai/client");
  const fal = createFalClient({ credentials: FAL_KEY, proxyUrl: { url: `${FARM_URL}/fal/proxy`, when: "always" } });
  await attempt("realtime", () => realtime(fal));
  sockets.length = 0;
  await attempt("sketch", () => sketch(fal));
} else if (mode === "realtime-serverless") {
  pointWebSocketsAtTheFarm();
  const fal = require("@fal-ai/serverless-client");
  const farmRest = (request) => {
    const url = new URL(request.url);
    return url.host === "rest.alpha.fal.ai" ? { ...request, url: `${FARM_URL}${url.pathname}${url.search}` } : request;
  };
  fal.config({ credentials: FAL_KEY, requestMiddleware: async (request) => farmRest(request) });
  await attempt("realtime", () => realtime(fal));
  // Once it has a token, this client arms `setTimeout(expireToken, 0.9 × 120 s)` (realtime.js),
  // which nothing clears or unrefs, close() included: Node would idle 108 s before exiting on its
  // own. The socket is closed by now (socketsClosed above), so the script ends itself.
  await new Promise((resolve) => process.stdout.write(`${JSON.stringify(out)}\n`, resolve));
  process.exit(0);
} else {
  throw new Error(`usage: node clients.mjs client|serverless|realtime-client|realtime-serverless (got ${mode})`);
}
console.log(JSON.stringify(out));
