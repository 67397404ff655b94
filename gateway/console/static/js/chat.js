// The chat playground: sessions from /chat/history, replies streamed over the /chat/ws WebSocket.
// Stopping a reply closes the socket; the gateway then cancels the generation and frees its slot.

import { api, getToken } from "./api.js";
import { byId, h, when } from "./dom.js";
import { renderMarkdown } from "./markdown.js";

const messages = byId("messages");
const prompt = byId("prompt");
const sendButton = byId("send");
const stopButton = byId("stop");
const status = byId("chat-status");
const sessionList = byId("session-list");
const modelSelect = byId("model");

let sessionId = null;
let socket = null; // an authenticated socket, reused for the next turn
let reply = null; // the turn being streamed

/** Start the chat view: models and sessions. */
export async function openChat() {
  const models = await api("GET", "/v1/models");
  const chosen = modelSelect.value;
  modelSelect.replaceChildren(...models.data.map((m) => h("option", { value: m.id }, m.id)));
  if (chosen) modelSelect.value = chosen;
  await refreshSessions();
}

/** Forget everything of the logged-out user. */
export function closeChat() {
  dropSocket();
  sessionId = null;
  messages.replaceChildren();
  sessionList.replaceChildren();
  status.textContent = "";
}

async function refreshSessions() {
  const history = await api("GET", "/chat/history?limit=50");
  sessionList.replaceChildren(
    ...history.sessions.map((s) => {
      const open = h(
        "button",
        { type: "button", className: "session-open", onclick: () => showSession(s.id) },
        s.title || "(untitled)",
        h("small", {}, `${when(s.updated_at)} · ${s.message_count} messages`),
      );
      if (s.id === sessionId) open.setAttribute("aria-current", "true");
      const remove = h(
        "button",
        { type: "button", className: "session-delete", onclick: () => deleteSession(s.id) },
        "Delete",
      );
      remove.setAttribute("aria-label", `Delete session ${s.title}`);
      return h("li", { dataset: { sessionId: s.id } }, open, remove);
    }),
  );
}

async function showSession(id) {
  if (reply) stop();
  const session = await api("GET", `/chat/history/${encodeURIComponent(id)}`);
  sessionId = session.id;
  if (session.model && [...modelSelect.options].some((o) => o.value === session.model)) {
    modelSelect.value = session.model;
  }
  messages.replaceChildren(...session.messages.map((m) => bubble(m.role, m.content)));
  status.textContent = `Session “${session.title}”`;
  await refreshSessions();
  prompt.focus();
}

async function deleteSession(id) {
  await api("DELETE", `/chat/history/${encodeURIComponent(id)}`);
  if (id === sessionId) newChat();
  await refreshSessions();
}

function newChat() {
  if (reply) stop();
  sessionId = null;
  messages.replaceChildren();
  status.textContent = "New chat";
  refreshSessions();
  prompt.focus();
}

function bubble(role, text) {
  const body = h("div", { className: "body" });
  body.append(renderMarkdown(text));
  return h("article", { className: `message ${role}`, dataset: { role } }, h("h3", {}, role), body);
}

function dropSocket() {
  if (socket) {
    socket.onmessage = socket.onclose = socket.onerror = null;
    socket.close();
    socket = null;
  }
}

/** An authenticated socket: the token goes in the first message, never in the URL. */
function connect() {
  if (socket && socket.readyState === WebSocket.OPEN) return Promise.resolve(socket);
  dropSocket();
  return new Promise((resolve, reject) => {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${scheme}//${location.host}/chat/ws`);
    ws.onopen = () => ws.send(JSON.stringify({ token: getToken() }));
    ws.onerror = () => reject(new Error("the chat connection failed"));
    ws.onclose = () => reject(new Error("the chat connection closed"));
    ws.onmessage = (event) => {
      const message = JSON.parse(event.data);
      if (message.type !== "ready") {
        reject(new Error(message.error ? message.error.message : "the chat connection was refused"));
        return;
      }
      socket = ws;
      ws.onmessage = (e) => onFrame(JSON.parse(e.data));
      ws.onclose = () => {
        socket = null;
        if (reply) finish("the connection closed");
      };
      resolve(ws);
    };
  });
}

function number(input) {
  return input.value === "" ? undefined : Number(input.value);
}

async function send(text) {
  const turn = {
    prompt: text,
    model: modelSelect.value || undefined,
    temperature: number(byId("temperature")),
    max_tokens: number(byId("max-tokens")),
  };
  if (sessionId) turn.session_id = sessionId;
  const system = byId("system").value.trim();
  if (system) turn.system = system;

  messages.append(bubble("user", text));
  const body = h("div", { className: "body" });
  const stats = h("p", { className: "stats" }, "waiting for the first token…");
  const article = h(
    "article",
    { className: "message assistant streaming", dataset: { role: "assistant" }, attrs: { "aria-busy": "true" } },
    h("h3", {}, "assistant"),
    body,
    stats,
  );
  messages.append(article);
  article.scrollIntoView({ block: "end" });
  const mine = { text: "", body, stats, article, sent: performance.now(), first: null, pieces: 0, queued: false };
  reply = mine;
  setBusy(true);
  try {
    const ws = await connect();
    // stopped while connecting: send nothing (the socket is closed, so nothing is generated)
    if (reply !== mine) {
      dropSocket();
      return;
    }
    ws.send(JSON.stringify(turn));
  } catch (error) {
    if (reply === mine) finish(error.message);
  }
}

function onFrame(frame) {
  if (!reply) return;
  if (frame.type === "delta") {
    if (reply.first === null) reply.first = performance.now();
    sessionId = frame.session_id;
    reply.text += frame.delta;
    reply.pieces += 1;
    if (!reply.queued) {
      // render at most once a frame, however fast the tokens come
      reply.queued = true;
      requestAnimationFrame(() => {
        if (!reply) return;
        reply.queued = false;
        reply.body.replaceChildren(renderMarkdown(reply.text));
        reply.stats.textContent = `${reply.pieces} pieces…`;
      });
    }
  } else if (frame.type === "done") {
    sessionId = frame.session_id;
    finish(null, frame);
  } else if (frame.type === "error") {
    finish(frame.error.message);
  }
}

/** End the current reply: show its text and its numbers (or why it ended). */
function finish(problem, done) {
  const r = reply;
  if (!r) return;
  reply = null;
  r.body.replaceChildren(renderMarkdown(r.text));
  r.article.classList.remove("streaming");
  r.article.removeAttribute("aria-busy");
  const end = performance.now();
  const parts = [];
  if (r.first !== null) {
    parts.push(`TTFT ${Math.round(r.first - r.sent)} ms`);
    const tokens = done ? done.usage.completion_tokens : r.pieces;
    const seconds = (end - r.first) / 1000;
    parts.push(`${tokens} tokens`);
    if (tokens > 1 && seconds > 0) parts.push(`${((tokens - 1) / seconds).toFixed(1)} tokens/s`);
  }
  if (done) parts.push(`finish: ${done.finish_reason}`);
  if (problem) {
    parts.push(problem);
    r.article.classList.add("failed");
  }
  r.stats.textContent = parts.join(" · ");
  setBusy(false);
  refreshSessions().catch(() => {});
}

/** Stop the reply: closing the socket makes the gateway cancel the generation. */
function stop() {
  dropSocket();
  finish("stopped");
}

function setBusy(busy) {
  sendButton.disabled = busy;
  stopButton.disabled = !busy;
  status.textContent = busy ? "Generating…" : "";
  if (!busy) prompt.focus();
}

byId("chat-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = prompt.value.trim();
  if (!text || reply) return;
  prompt.value = "";
  send(text);
});

prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    byId("chat-form").requestSubmit();
  }
});

stopButton.addEventListener("click", stop);
byId("new-chat").addEventListener("click", newChat);
