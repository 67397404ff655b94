// The gateway's HTTP API. The bearer token lives in this module only: never in a URL, a cookie or
// web storage, so a reload logs out and no other page can send requests on the user's behalf.

let token = null;
let onUnauthorized = () => {};

/** An API error with the gateway's message and HTTP status. */
export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function setToken(value) {
  token = value;
}

export function getToken() {
  return token;
}

/** Called when a request is refused with 401 (an expired token): the console shows the login again. */
export function setUnauthorizedHandler(handler) {
  onUnauthorized = handler;
}

/**
 * Call the API with the token.
 * @param {string} method HTTP method
 * @param {string} path path on this origin
 * @param {*} [body] JSON body
 * @returns {Promise<*>} the decoded JSON body (null for 204)
 */
export async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "omit",
    cache: "no-store",
  });
  if (response.status === 204) return null;
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    const error = data && data.error ? data.error : {};
    if (response.status === 401 && token) onUnauthorized();
    throw new ApiError(response.status, error.message || `HTTP ${response.status}`, error.code);
  }
  return data;
}

/** Log in; keeps the token and returns the login answer ({username, is_admin, ...}). */
export async function login(username, password) {
  const answer = await api("POST", "/auth/login", { username, password });
  token = answer.access_token;
  return answer;
}
