// The console's entry: login, the views and who may see which. The gateway enforces the roles;
// the console only leaves out the admin views for a user who would be refused anyway.

import { api, login, setToken, setUnauthorizedHandler } from "./api.js";
import { byId } from "./dom.js";
import { closeChat, openChat } from "./chat.js";
import { startDashboard, stopDashboard } from "./dashboard.js";
import { openAccess } from "./access.js";

const VIEWS = { chat: openChat, dashboard: startDashboard, access: openAccess };
const nav = byId("nav");
let admin = false;

async function show(view) {
  for (const name of ["login", ...Object.keys(VIEWS)]) byId(`${name}-view`).hidden = name !== view;
  for (const button of nav.querySelectorAll("button")) {
    if (button.dataset.view === view) button.setAttribute("aria-current", "page");
    else button.removeAttribute("aria-current");
  }
  if (view !== "dashboard") stopDashboard();
  if (VIEWS[view]) {
    try {
      await VIEWS[view]();
    } catch (error) {
      byId("chat-status").textContent = error.message;
    }
  }
}

function signedIn(answer) {
  admin = answer.is_admin;
  byId("who").textContent = `${answer.username}${admin ? " (admin)" : ""}`;
  byId("who-box").hidden = false;
  nav.hidden = false;
  for (const button of nav.querySelectorAll("[data-admin]")) button.hidden = !admin;
  show("chat");
  byId("prompt").focus();
}

function signOut(message = "") {
  setToken(null);
  admin = false;
  stopDashboard();
  closeChat();
  nav.hidden = true;
  byId("who-box").hidden = true;
  byId("login-error").textContent = message;
  show("login");
  byId("login-username").focus();
}

byId("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const error = byId("login-error");
  error.textContent = "";
  try {
    const answer = await login(byId("login-username").value.trim(), byId("login-password").value);
    byId("login-password").value = "";
    signedIn(answer);
  } catch (problem) {
    error.textContent = problem.message;
  }
});

nav.addEventListener("click", (event) => {
  const view = event.target.closest("button")?.dataset.view;
  if (view && (admin || !nav.querySelector(`[data-view="${view}"]`).hasAttribute("data-admin"))) show(view);
});

byId("logout").addEventListener("click", async () => {
  // revoke the token on the server too, so a copy of it (if one leaked) stops working now
  await api("POST", "/auth/logout").catch(() => {});
  signOut();
});
setUnauthorizedHandler(() => signOut("Your session has expired: log in again."));
signOut();
