// HTTP helpers: the API key from sessionStorage, the server's error envelope as an Error,
// and an SSE reader for streaming /v1/generate.

const KEY = "steerserve.apiKey";

export function apiKey() { return sessionStorage.getItem(KEY) || ""; }
export function setApiKey(value) {
  if (value) sessionStorage.setItem(KEY, value); else sessionStorage.removeItem(KEY);
}

/** An HTTP error carrying the envelope's message, param and status. */
export class ApiError extends Error {
  constructor(status, message, param, retryAfter) {
    super(message);
    this.status = status;
    this.param = param;
    this.retryAfter = retryAfter;
  }
  /** What to show: the server's message, with what to do for 401/429/503. */
  describe() {
    const where = this.param ? ` (${this.param})` : "";
    const wait = this.retryAfter ? ` Retry in ${this.retryAfter} s.` : "";
    if (this.status === 401) return `${this.message}: enter the server's key in the API key field.`;
    if (this.status === 429) return `The server is busy: ${this.message}.${wait}`;
    if (this.status === 503) return `The server is not ready: ${this.message}.${wait}`;
    return `${this.status ? this.status + ": " : ""}${this.message}${where}`;
  }
}

function headers(extra = {}) {
  const h = { ...extra };
  const key = apiKey();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function toError(resp) {
  let message = resp.statusText || "request failed", param = null;
  try {
    const body = await resp.json();
    if (body && body.error) { message = body.error.message; param = body.error.param; }
    else if (body && body.detail) message = body.detail;
  } catch { /* not JSON: keep the status text */ }
  return new ApiError(resp.status, message, param, resp.headers.get("Retry-After"));
}

async function send(method, path, body, raw = false) {
  const init = { method, headers: headers() };
  if (body instanceof Blob || body instanceof ArrayBuffer) {
    init.body = body;
    init.headers["Content-Type"] = "application/octet-stream";
  } else if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  let resp;
  try { resp = await fetch(path, init); }
  catch (e) { throw new ApiError(0, `could not reach the server (${e.message})`); }
  if (!resp.ok) throw await toError(resp);
  return raw ? resp : resp.json();
}

export const api = {
  get: (path) => send("GET", path),
  post: (path, body) => send("POST", path, body),
  put: (path, body) => send("PUT", path, body),
  del: (path) => send("DELETE", path),
  blob: async (path) => (await send("GET", path, undefined, true)).blob(),
};

/** POST a streaming generate; call onFrame(frame) for each SSE data frame. An in-band
 * error frame (the stream had started) is thrown as an ApiError. */
export async function streamGenerate(body, onFrame) {
  const resp = await send("POST", "/v1/generate", { ...body, stream: true }, true);
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trim()).join("\n");
      if (!data || data === "[DONE]") continue;
      const frame = JSON.parse(data);
      if (frame.error) throw new ApiError(frame.error.code, frame.error.message, frame.error.param);
      onFrame(frame);
    }
  }
}
