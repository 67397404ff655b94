// Users and API keys (admin routes). A new key's full value is shown once, as the gateway returns it.

import { api } from "./api.js";
import { byId, h, when } from "./dom.js";

const problem = byId("access-error");

/** Load the users and keys. */
export async function openAccess() {
  problem.textContent = "";
  byId("new-key").hidden = true;
  byId("new-key-value").value = "";
  await refresh();
}

async function refresh() {
  const [{ users }, { keys }] = await Promise.all([api("GET", "/admin/users"), api("GET", "/admin/keys")]);
  const names = byId("key-username");
  const chosen = names.value;
  names.replaceChildren(
    ...users.filter((u) => !u.disabled_at).map((u) => h("option", { value: u.username }, u.username)),
  );
  if (chosen) names.value = chosen;
  byId("user-rows").replaceChildren(...users.map(userRow));
  byId("key-rows").replaceChildren(...keys.map(keyRow));
}

function userRow(user) {
  const disable = user.disabled_at
    ? null
    : h("button", { type: "button", onclick: () => act(() => api("POST", `/admin/users/${user.id}/disable`)) }, "Disable");
  if (disable) disable.setAttribute("aria-label", `Disable ${user.username}`);
  return h(
    "tr",
    { dataset: { user: user.username } },
    h("th", { scope: "row" }, user.username),
    h("td", {}, user.role),
    h("td", {}, when(user.created_at)),
    h("td", {}, user.disabled_at ? `disabled ${when(user.disabled_at)}` : "active"),
    h("td", {}, disable),
  );
}

function keyRow(key) {
  const revoke = key.revoked_at
    ? null
    : h("button", { type: "button", onclick: () => act(() => api("DELETE", `/admin/keys/${key.id}`)) }, "Revoke");
  if (revoke) revoke.setAttribute("aria-label", `Revoke ${key.key_prefix}`);
  return h(
    "tr",
    { dataset: { keyId: key.id } },
    h("th", { scope: "row" }, h("code", {}, key.key_prefix)),
    h("td", {}, key.username ?? key.user_id),
    h("td", {}, key.scopes.join(", ")),
    h("td", {}, when(key.created_at)),
    h("td", {}, key.revoked_at ? `revoked ${when(key.revoked_at)}` : "active"),
    h("td", {}, revoke),
  );
}

async function act(call) {
  problem.textContent = "";
  try {
    const answer = await call();
    await refresh();
    return answer;
  } catch (error) {
    problem.textContent = error.message;
    return null;
  }
}

byId("user-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const created = await act(() =>
    api("POST", "/admin/users", {
      username: byId("new-username").value.trim(),
      password: byId("new-password").value,
      role: byId("new-role").value,
    }),
  );
  if (created) event.target.reset();
});

byId("key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const scopes = [];
  if (byId("scope-inference").checked) scopes.push("inference");
  if (byId("scope-admin").checked) scopes.push("admin");
  const created = await act(() => api("POST", "/admin/keys", { username: byId("key-username").value, scopes }));
  if (created) {
    const value = byId("new-key-value");
    value.value = created.key;
    byId("new-key").hidden = false;
    value.focus();
    value.select();
  }
});
