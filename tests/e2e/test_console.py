"""The web console at ``/ui`` in a real headless Chromium (Debian's ``chromium`` driven by Playwright)
against a real ``pocketllm serve`` process on the real model.

``UPDATE_SCREENSHOTS=1`` also writes the README's screenshots (``docs/console-*.png``).
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from auth.stores import open_store
from tests.conftest import MODEL_ID, free_port, login
from tests.serve_support import server_env, start_server, wait_healthy

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')"
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs"
INJECTION = '<img src=x onerror="window.__pwned = 1">'

NO_VALUE = "\N{EN DASH}"  # what the dashboard shows for a value it does not have yet
Page = Any  # playwright.sync_api.Page (the module is imported only when installed)


class Console:
    """The server under test: its URL, data directory and an admin token for checks from outside."""

    def __init__(self, base_url: str, data_dir: str) -> None:
        self.base_url = base_url
        self.data_dir = data_dir
        self.admin_token = login(base_url, "admin", "admin123")
        self.admin = {"Authorization": f"Bearer {self.admin_token}"}

    def health(self) -> dict[str, Any]:
        body: dict[str, Any] = httpx.get(f"{self.base_url}/health", timeout=10).json()["models"][MODEL_ID]
        return body

    def metrics(self) -> dict[str, Any]:
        response = httpx.get(f"{self.base_url}/admin/metrics", headers=self.admin, timeout=10)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def wait_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.health()
            if not state["busy"] and not state["queued"]:
                return
            time.sleep(0.1)
        raise AssertionError(f"the model never went idle: {self.health()}")


@pytest.fixture(scope="module")
def console() -> Iterator[Console]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: Debian's chromium package (.ci/run installs it)")
    port = free_port()
    env = server_env(MODEL_SLOTS="2", MODEL_N_CTX="4096", MODEL_N_THREADS="2")
    process = start_server(port, env)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(process, base_url)
        yield Console(base_url, env["POCKETLLM_DATA_DIR"])
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():  # a test may ask for the browser before the console (which skips too)
        pytest.skip(f"{CHROMIUM} is missing: Debian's chromium package (.ci/run installs it)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any, console: Console) -> Iterator[Page]:
    """A fresh browser context (nothing shared with other tests) that fails the test on any script error
    or Content-Security-Policy violation of the console itself."""
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on(
        "console",
        lambda message: (
            problems.append(f"console {message.type}: {message.text}")
            if message.type == "error" or "Content Security Policy" in message.text
            else None
        ),
    )
    yield page
    context.close()
    assert not problems, problems


def log_in(page: Page, console: Console, username: str, password: str) -> None:
    """Open ``/`` as a browser does (redirected to the console) and log in with the keyboard only."""
    page.goto(f"{console.base_url}/")
    assert page.url == f"{console.base_url}/ui/"
    username_box = page.locator("#login-view").get_by_label("Username")
    sync_api.expect(username_box).to_be_focused()
    page.keyboard.type(username)
    page.keyboard.press("Tab")
    page.keyboard.type(password)
    page.keyboard.press("Enter")
    sync_api.expect(page.locator("#who")).to_contain_text(username)
    sync_api.expect(page.locator("#model option")).not_to_have_count(0)


def set_parameters(page: Page, *, max_tokens: int, temperature: float = 0) -> None:
    if page.locator("details.params[open]").count() == 0:
        page.get_by_text("Model and parameters").click()
    page.get_by_label("Max tokens").fill(str(max_tokens))
    page.get_by_label("Temperature").fill(str(temperature))


def message_box(page: Page) -> Any:
    return page.get_by_role("textbox", name="Message", exact=True)


def send(page: Page, text: str) -> None:
    message_box(page).fill(text)
    message_box(page).press("Enter")


def record_reply_lengths(page: Page) -> None:
    """Record in ``window.__lengths`` the length of the streaming reply each time it changes."""
    page.evaluate(
        """() => {
            window.__lengths = [];
            new MutationObserver(() => {
                const reply = document.querySelector('.message.assistant.streaming .body');
                if (reply) window.__lengths.push(reply.textContent.length);
            }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
        }"""
    )


def last_reply(page: Page, timeout_ms: float = 120_000) -> Any:
    reply = page.locator(".message.assistant").last
    sync_api.expect(reply).not_to_have_class(re.compile("streaming"), timeout=timeout_ms)
    return reply


def screenshot(page: Page, name: str) -> None:
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(exist_ok=True)
        path = SCREENSHOTS / name
        page.screenshot(path=str(path))
        assert path.stat().st_size < 150_000, f"{name} is {path.stat().st_size} bytes"


def test_root_redirects_a_browser_and_console_has_a_strict_policy(console: Console) -> None:
    html = httpx.get(f"{console.base_url}/", headers={"Accept": "text/html,*/*;q=0.8"})
    assert html.status_code == 302 and html.headers["location"] == "/ui/"
    for accept in ("application/json", "*/*"):
        as_json = httpx.get(f"{console.base_url}/", headers={"Accept": accept})
        assert as_json.status_code == 200 and as_json.json()["models"] == [MODEL_ID]

    for path in ("/ui/", "/ui/js/main.js", "/ui/console.css"):
        response = httpx.get(f"{console.base_url}{path}")
        assert response.status_code == 200, path
        policy = response.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
        assert response.headers["x-content-type-options"] == "nosniff"
    page = httpx.get(f"{console.base_url}/ui/").text
    assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", page) == []  # no inline script
    assert " style=" not in page and "<style" not in page  # no inline style
    assert "http://" not in page and "https://" not in page  # nothing from a CDN
    assert (
        httpx.get(f"{console.base_url}/ui/js/main.js").headers["content-type"].startswith("text/javascript")
    )


def test_chat_streams_in_pieces_and_the_session_survives_a_reload(page: Page, console: Console) -> None:
    log_in(page, console, "user1", "password123")
    set_parameters(page, max_tokens=40)
    record_reply_lengths(page)
    send(page, "Tell me about the sea in three sentences.")
    reply = last_reply(page)
    text = reply.locator(".body").inner_text()
    lengths: list[int] = page.evaluate("window.__lengths")
    growing = sorted(set(lengths))
    final = len(reply.locator(".body").text_content())
    assert len(growing) >= 3 and growing[-1] <= final, (lengths, final)  # the reply arrived in pieces
    stats = reply.locator(".stats").inner_text()
    assert re.search(r"TTFT \d+ ms · \d+ tokens · [\d.]+ tokens/s · finish: (stop|length)", stats), stats
    screenshot(page, "console-chat.png")

    page.reload()  # the token was in memory only: the reload logs out
    sync_api.expect(page.locator("#login-view")).to_be_visible()
    log_in(page, console, "user1", "password123")
    session = page.locator("#session-list li").filter(has_text="Tell me about the sea in three sentences.")
    sync_api.expect(session).to_have_count(1)
    session.get_by_role("button").first.click()
    sync_api.expect(page.locator(".message.user")).to_have_text(re.compile("Tell me about the sea"))
    sync_api.expect(page.locator(".message.assistant .body")).to_have_text(text)

    session.get_by_role("button", name=re.compile("^Delete session")).click()
    sync_api.expect(session).to_have_count(0)


def test_stop_cancels_the_generation_and_frees_the_slot(page: Page, console: Console) -> None:
    log_in(page, console, "user1", "password123")
    set_parameters(page, max_tokens=1500)
    console.wait_idle()
    record_reply_lengths(page)
    prompt = f"Count from 1 to 500, one number per line. ({time.time()})"
    send(page, prompt)
    page.wait_for_function("() => window.__lengths.length >= 5", timeout=120_000)
    assert console.health()["busy"] == 1
    page.get_by_role("button", name="Stop").click()

    reply = last_reply(page, timeout_ms=5_000)
    assert "stopped" in reply.locator(".stats").inner_text()
    stopped = time.monotonic()
    while console.health()["busy"] and time.monotonic() < stopped + 10:
        time.sleep(0.05)
    assert console.health()["busy"] == 0
    assert time.monotonic() - stopped < 3  # the slot was freed at once, not after 1500 tokens
    # the reply never finished: a session records an exchange only when its reply is complete
    user = {"Authorization": f"Bearer {login(console.base_url, 'user1', 'password123')}"}
    sessions = httpx.get(f"{console.base_url}/chat/history", headers=user, timeout=10).json()["sessions"]
    assert [s["message_count"] for s in sessions if s["title"] == prompt] == [0]
    # the console carries on with a new connection
    set_parameters(page, max_tokens=4)
    send(page, "Hello")
    assert "finish: length" in last_reply(page).locator(".stats").inner_text()


def seed_session(console: Console, username: str, messages: list[tuple[str, str]]) -> str:
    """Write a session straight into the server's SQLite store (what a model could have said)."""

    async def write() -> str:
        store = open_store(console.data_dir)
        try:
            user = await store.get_user_by_name(username)
            assert user is not None
            session = await store.create_session(user.id, "injection check", MODEL_ID)
            await store.add_messages(user.id, session.id, messages)
            return session.id
        finally:
            await store.close()

    # Playwright's sync API runs an event loop in this thread: the store gets a thread of its own
    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(asyncio.run(write())))
    thread.start()
    thread.join(timeout=30)
    return result[0]


def test_model_output_is_rendered_as_text_never_as_html(page: Page, console: Console) -> None:
    reply = (
        f"Here it is: {INJECTION} and <script>window.__pwned = 2</script> in **bold**\n"
        "[a link](javascript:window.__pwned=3) and [docs](https://example.com/x)\n"
        f"```html\n{INJECTION}\n```"
    )
    seed_session(console, "user1", [("user", "show me an image tag"), ("assistant", reply)])
    log_in(page, console, "user1", "password123")
    page.locator("#session-list li").filter(has_text="injection check").get_by_role("button").first.click()
    body = page.locator(".message.assistant .body")
    sync_api.expect(body).to_contain_text(INJECTION)
    assert body.locator("pre code").inner_text() == INJECTION  # the code block, as text
    sync_api.expect(body.locator("strong")).to_have_text("bold")  # markdown still renders
    assert page.locator("#messages img, #messages script, #messages iframe").count() == 0
    links = body.locator("a")
    assert links.count() == 1 and links.get_attribute("href") == "https://example.com/x"
    assert "[a link](javascript:window.__pwned=3)" in body.inner_text()

    # the renderer itself, on more vectors: only its own elements, no attribute but a checked href
    vectors = [
        INJECTION,
        "<svg onload=alert(1)>",
        '<a href="javascript:alert(1)">x</a>',
        "[x](javascript:alert(1)) [y](data:text/html,<script>alert(1)</script>) [z](JaVaScRiPt:alert(1))",
        "```\n</code></pre><img src=x onerror=alert(1)>\n```",
        "# <b>title</b>\n- <i>item</i>\n> <iframe src=/>",
        "`<script>alert(1)</script>` **<u>x</u>** *<em>y</em>*",
    ]
    rendered = page.evaluate(
        """async (vectors) => {
            const { renderMarkdown } = await import('/ui/js/markdown.js');
            return vectors.map((text) => {
                const holder = document.createElement('div');
                holder.append(renderMarkdown(text));
                return {
                    tags: [...holder.querySelectorAll('*')].map((e) => e.tagName.toLowerCase()),
                    attributes: [...holder.querySelectorAll('*')].flatMap((e) => e.getAttributeNames()),
                    text: holder.textContent,
                };
            });
        }""",
        vectors,
    )
    allowed = {
        "p",
        "br",
        "code",
        "strong",
        "em",
        "figure",
        "figcaption",
        "pre",
        "ul",
        "ol",
        "li",
        "h3",
        "blockquote",
    }
    for vector, result in zip(vectors, rendered, strict=True):
        assert set(result["tags"]) <= allowed, (vector, result)
        assert set(result["attributes"]) <= {"class"}, (vector, result)
        assert "<" in result["text"], (vector, result)  # the markup is still there, as characters

    # a live reply takes the same path: ask the model to repeat the tag, whatever it says stays text
    set_parameters(page, max_tokens=40)
    send(page, f"Repeat exactly: {INJECTION}")
    last_reply(page)
    time.sleep(0.5)  # an image that was created would have failed to load and run its handler by now
    assert page.locator("#messages img, #messages script").count() == 0
    assert page.evaluate("window.__pwned") is None


def test_a_user_sees_no_admin_views_and_the_gateway_refuses_them(page: Page, console: Console) -> None:
    sent: list[tuple[str, str | None]] = []  # every request of the page: URL and Authorization header
    page.on("request", lambda request: sent.append((request.url, request.headers.get("authorization"))))
    log_in(page, console, "user1", "password123")
    sync_api.expect(page.get_by_role("button", name="Chat", exact=True)).to_be_visible()
    sync_api.expect(page.get_by_role("button", name="Dashboard")).to_be_hidden()
    sync_api.expect(page.get_by_role("button", name="Users & keys")).to_be_hidden()
    bearer = next(header for url, header in sent if header and url.endswith("/chat/history?limit=50"))
    token = bearer.removeprefix("Bearer ")
    assert all(token not in url for url, _ in sent)  # never in a URL

    # hiding is not the control: the very token the console holds is refused by every admin route
    user = {"Authorization": bearer}
    calls = [
        ("GET", "/admin/metrics", None),
        ("GET", "/admin/users", None),
        ("POST", "/admin/users", {"username": "mallory", "password": "password123"}),
        ("GET", "/admin/keys", None),
        ("POST", "/admin/keys", {"username": "user1", "scopes": ["admin"]}),
        ("POST", "/admin/cache/flush", None),
        ("POST", f"/admin/models/{MODEL_ID}/unload", None),
    ]
    for method, path, body in calls:
        response = httpx.request(method, f"{console.base_url}{path}", json=body, headers=user, timeout=10)
        assert response.status_code == 403, (method, path, response.text)
        assert response.json()["error"]["code"] == "permission_denied"
    assert console.health()["state"] == "ready"

    # logging out revokes the token on the server, not only in the page
    assert httpx.get(f"{console.base_url}/chat/history", headers=user, timeout=10).status_code == 200
    page.get_by_role("button", name="Log out").click()
    sync_api.expect(page.locator("#login-view")).to_be_visible()
    assert httpx.get(f"{console.base_url}/chat/history", headers=user, timeout=10).status_code == 401


def stream_load(console: Console, key: str, stop: threading.Event) -> None:
    client = openai.OpenAI(base_url=f"{console.base_url}/v1", api_key=key, max_retries=0)
    while not stop.is_set():
        stream = client.chat.completions.create(
            model=MODEL_ID,
            messages=[{"role": "user", "content": "Write a long story about a lighthouse."}],
            max_tokens=48,
            temperature=1.0,
            stream=True,
        )
        for _ in stream:
            pass


def test_admin_dashboard_charts_move_under_load(page: Page, console: Console) -> None:
    log_in(page, console, "admin", "admin123")
    page.get_by_role("button", name="Dashboard").click()
    tokens_chart = page.locator('[data-chart="tokens"]')
    sync_api.expect(tokens_chart.locator("li")).not_to_have_count(0)
    canvas = tokens_chart.locator("canvas")
    before = canvas.evaluate("c => c.toDataURL()")
    key = httpx.post(
        f"{console.base_url}/admin/keys", json={"username": "user1"}, headers=console.admin, timeout=10
    ).json()["key"]

    stop = threading.Event()
    workers = [threading.Thread(target=stream_load, args=(console, key, stop)) for _ in range(2)]
    for worker in workers:
        worker.start()
    try:
        busy = page.locator('[data-chart="slots"] li').filter(has_text="busy").locator("output")
        sync_api.expect(busy).to_have_text(re.compile("^[12]$"), timeout=60_000)
        rate = page.locator('[data-chart="tokens"] li').filter(has_text="output tokens/s").locator("output")
        sync_api.expect(rate).not_to_have_text(re.compile(f"^(0|{NO_VALUE})$"), timeout=60_000)
        ttft = page.locator('[data-chart="ttft"] li').filter(has_text="p95").locator("output")
        sync_api.expect(ttft).not_to_have_text(NO_VALUE, timeout=60_000)
        screenshot(page, "console-dashboard.png")
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=120)
    assert canvas.evaluate("c => c.toDataURL()") != before
    assert canvas.get_attribute("aria-label").startswith("Tokens/s: output tokens/s ")  # a text alternative
    tiles = page.locator("#tiles")
    sync_api.expect(tiles).to_contain_text("Redis")

    # operations: flush the cache, unload and load the model
    page.get_by_role("button", name="Flush the cache").click()
    sync_api.expect(page.locator("#cache-result")).to_have_text(re.compile(r"^Flushed \d+ entries\.$"))
    console.wait_idle()
    row = page.locator(f'tr[data-model="{MODEL_ID}"]')
    row.get_by_role("button", name=f"Unload {MODEL_ID}").click()
    sync_api.expect(row.locator("td").first).to_have_text("unloaded", timeout=60_000)
    assert console.health()["state"] == "unloaded"
    row.get_by_role("button", name=f"Load {MODEL_ID}").click()
    sync_api.expect(row.locator("td").first).to_have_text("ready", timeout=120_000)
    assert console.health()["state"] == "ready"


def test_admin_creates_a_key_the_sdk_uses_then_revokes_it(page: Page, console: Console) -> None:
    log_in(page, console, "admin", "admin123")
    page.get_by_role("button", name="Users & keys").click()
    page.get_by_label("Username", exact=True).last.fill("console-bob")
    page.get_by_label("Password (8+ characters)").fill("bob-password-1")
    page.get_by_role("button", name="Create user").click()
    sync_api.expect(page.locator('tr[data-user="console-bob"]')).to_contain_text("active")

    page.get_by_label("For user").select_option("console-bob")
    page.get_by_role("button", name="Create key").click()
    shown = page.get_by_label("The new key (shown once: copy it now)")
    sync_api.expect(shown).to_have_value(re.compile(r"^sk-pl-"))
    key = shown.input_value()
    assert key not in page.locator("#key-rows").inner_text()  # the list shows a prefix only

    client = openai.OpenAI(base_url=f"{console.base_url}/v1", api_key=key, max_retries=0)
    answer = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert answer.choices[0].message.content

    row = page.locator("#key-rows tr").filter(has=page.locator("td", has_text="console-bob"))
    row.get_by_role("button", name=re.compile("^Revoke")).click()
    sync_api.expect(row).to_contain_text("revoked")
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )

    page.get_by_role("button", name="Disable console-bob").click()
    sync_api.expect(page.locator('tr[data-user="console-bob"]')).to_contain_text("disabled")
    refused = httpx.post(
        f"{console.base_url}/auth/login", json={"username": "console-bob", "password": "bob-password-1"}
    )
    assert refused.status_code == 401


def test_phone_width_and_labels(browser: Any, console: Console) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = context.new_page()
    try:
        log_in(page, console, "admin", "admin123")
        for view in ("Chat", "Dashboard", "Users & keys"):
            page.get_by_role("button", name=view, exact=True).click()
            page.wait_for_timeout(300)
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, (view, width)  # no sideways scrolling of the page
        unlabelled = page.evaluate(
            """() => [...document.querySelectorAll('input, select, textarea')]
                  .filter(e => !e.labels.length && !e.getAttribute('aria-label')).map(e => e.id)"""
        )
        assert unlabelled == []
    finally:
        context.close()
