"""Issue 16 in a real browser: the console of a 3-node mesh, driven in Chromium by Playwright.

Real node processes on loopback addresses, started once for the module: A serves SmolLM2 (and listens on every
interface, with an API key), B joined without a model (a standby), C is a client that carries the blackboard. The
browser opens C's console and sees all three members and their links; chats with the model on A through C's own
`/v1`; sees a post typed in A's console arrive in C's feed; A's console shows the invite token to a browser on
this machine and never to one that reaches it at the machine's network address. The markdown renderer is given
model output with HTML in it and must render it as text. Last, B is killed and C's page shows it dead, live.

The element ids and classes are the ones `mesh_mcp/static/console.js` documents at its top; the data is the
contract of `/api/status` (`mesh`). Every wait is bounded (Playwright's expect, `TIMEOUT_MS`).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from inference.models import ensure_model
from inference.provision import ensure_llama_cpp
from tests.conftest import SMOLLM
from tests.harness import NodeProcess
from tests.security.test_dead_peer import kill_node
from tests.test_mesh import token_of, wait_models

pytest.register_assert_rewrite("tests.browser")  # the plugin named below: imported here, its asserts rewritten
from tests.browser import TIMEOUT_MS, OpenPage, Page, expect, screenshot  # noqa: E402

pytest_plugins = ["tests.browser"]

KEY = "browser-test-key"
NODES = "#topology-svg g.node[data-node-id]"
LINKS = "#topology-svg line.link"


class Mesh:
    """The module's three nodes, by role."""

    def __init__(self, a: NodeProcess, b: NodeProcess, c: NodeProcess, token: str) -> None:
        self.a, self.b, self.c, self.token = a, b, c, token
        self.ids = {name: node.status()["node_id"] for name, node in (("a", a), ("b", b), ("c", c))}


def network_address() -> str:
    """This machine's first non-loopback IPv4 address: a viewer there is not local (the guard's `is_local`)."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True)
    found = re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/", out.stdout)
    if not found:
        pytest.fail(f"the non-loopback viewer needs a network address on this machine; `ip -4 addr` says:\n{out}")
    return found[0]


def members_of(status: dict[str, Any]) -> dict[str, str]:
    """node_id -> state of every member the status's `mesh` lists."""
    return {m["node_id"]: m["state"] for m in status.get("mesh", {}).get("members", [])}


ROOT = Path(__file__).resolve().parent.parent


def readme_test_command() -> str:
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", setup_section(), re.DOTALL) if "pytest" in b]
    return block.strip()


def setup_section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("\n## Two commands\n")
    return text[start : text.index("\n## ", start + 1)]


def test_ci_runs_the_readmes_test_command_which_installs_chromium() -> None:
    command = readme_test_command()
    assert (ROOT / ".ci" / "run").read_text(encoding="utf-8").rstrip().splitlines()[-1] == command
    assert "apt-get install" in command and "chromium" in command and "'.[test]'" in command


def test_the_browser_runs_module_scripts(page: Page) -> None:
    """The fixtures work here (Chromium found and launched headless): the console's scripts are ES modules."""
    page.set_content(
        '<p id="out">static</p><script type="module">document.getElementById("out").textContent = "ran"</script>'
    )
    expect(page.locator("#out")).to_have_text("ran")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, test_models_dir: Path) -> Iterator[Mesh]:
    # The llama.cpp build and SmolLM2 as the `llama` and `smollm` fixtures make them, but in a thread: Playwright's
    # sync API runs an event loop on this one while the browser is open, and anyio.run refuses to nest in it.
    with ThreadPoolExecutor(1) as worker:
        worker.submit(anyio.run, ensure_llama_cpp).result()
        worker.submit(anyio.run, lambda: ensure_model(SMOLLM, models_dir=test_models_dir)).result()
    home = tmp_path_factory.mktemp("console-mesh")
    nodes: list[NodeProcess] = []

    def start(name: str, ip: str, *args: str) -> NodeProcess:
        env = {"MESH_LLM_MODELS": str(test_models_dir)}
        node = NodeProcess(home=home / name, args=["--mesh-host", ip, *args], env=env).start()
        nodes.append(node)
        return node

    try:
        # A serves SmolLM2 as a pipeline split over A and B (B joins without a model and lends its capacity), so the
        # page has a split to draw; C is a client.
        a = start(
            "a", "127.0.0.2", "--name", "alpha", "--model", SMOLLM, "--split", "2", "--listen-all", "--api-key", KEY
        )
        token = token_of(a)
        b = start("b", "127.0.0.3", "--name", "bravo", "--join", token)
        a.wait_model_state(SMOLLM, "serving", timeout=240)
        c = start("c", "127.0.0.4", "--name", "charlie", "--client", "--blackboard", "--join", token)
        for node in (b, c):
            node.wait_for("up", lambda s: True, timeout=60)
        wait_models(c, {SMOLLM}, timeout=60)
        found = Mesh(a, b, c, token)
        c.wait_for(
            "C sees all three members alive",
            lambda s: set(members_of(s).values()) == {"alive"} and set(members_of(s)) == set(found.ids.values()),
            timeout=120,
        )
        yield found
    finally:
        for node in nodes:
            node.stop()


def open_console(open_page: OpenPage, node: NodeProcess, **options: Any) -> Page:
    page = open_page(**options)
    page.goto(node.console + "/")
    return page


@pytest.mark.slow
def test_the_console_of_a_client_shows_every_member_and_their_links(mesh: Mesh, open_page: OpenPage) -> None:
    page = open_console(open_page, mesh.c)
    expect(page.locator(NODES)).to_have_count(3, timeout=TIMEOUT_MS)
    for node_id in mesh.ids.values():
        expect(page.locator(f'{NODES}[data-node-id="{node_id}"]')).to_have_count(1)
    expect(page.locator(f'{NODES}[data-node-id="{mesh.ids["c"]}"]')).to_contain_text("charlie")
    # Every link C's status lists (A and B measure each other; a client measures none yet) is drawn.
    links = mesh.c.wait_for("C's links", lambda s: len(s["mesh"]["links"]) >= 1, timeout=120)["mesh"]["links"]
    for link in links:
        pair = (
            f'{LINKS}[data-a="{link["a"]}"][data-b="{link["b"]}"], {LINKS}[data-a="{link["b"]}"][data-b="{link["a"]}"]'
        )
        expect(page.locator(pair)).to_have_count(1, timeout=TIMEOUT_MS)
    # Where the model runs, on a node that hosts none of it: the split's stages from A's signed record.
    row = page.locator(f'#models tr[data-model="{SMOLLM}"][data-mode="split"]')
    expect(row).to_have_count(1, timeout=TIMEOUT_MS)
    for name in ("a", "b"):
        expect(row.locator(f'li.stage[data-node-id="{mesh.ids[name]}"]')).to_have_count(1)
    expect(page.locator(f'path.hull[data-model="{SMOLLM}"][data-mode="split"]')).to_have_count(1)
    expect(page.locator(f'{NODES}[data-node-id="{mesh.ids["b"]}"][data-role="worker"]')).to_have_count(1)
    screenshot(page, "topology")


@pytest.mark.slow
def test_the_invite_token_is_shown_to_this_machine_only(mesh: Mesh, open_page: OpenPage) -> None:
    local = open_console(open_page, mesh.a)
    expect(local.locator("#invite-token")).to_have_text(mesh.token, timeout=TIMEOUT_MS)
    expect(local.locator("#join")).to_be_visible()
    expect(local.locator("#join-command")).to_contain_text(f"--join {mesh.token}")

    address = network_address()
    remote = open_page(extra_http_headers={"Authorization": f"Bearer {KEY}"})
    remote_url = f"http://{address}:{mesh.a.console_port}"
    status = httpx2.get(remote_url + "/api/status", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert status.status_code == 200 and "invite_token" not in status.json(), status.text
    remote.goto(remote_url + "/")
    # The page has rendered the mesh (so the token had its chance to appear) and still shows none of it.
    expect(remote.locator(NODES)).to_have_count(3, timeout=TIMEOUT_MS)
    expect(remote.locator("#join")).to_be_hidden()
    expect(remote.locator("#invite-token")).to_have_text("")
    assert mesh.token not in remote.content()


@pytest.mark.slow
def test_model_output_with_html_is_rendered_as_text(mesh: Mesh, page: Page) -> None:
    page.goto(mesh.c.console + "/")
    hostile = (
        'Hi <img src=x onerror="window.mdPwned=1"> **bold** <script>window.mdPwned=2</script>\n\n```\n<b>x</b>\n```'
    )
    rendered = page.evaluate(
        """async (text) => {
            const { renderMarkdown } = await import("/static/markdown.js");
            const box = document.createElement("div");
            box.appendChild(renderMarkdown(text));
            document.body.appendChild(box);
            await new Promise((r) => setTimeout(r, 50));  // an injected onerror would have fired by now
            return {
                tags: [...box.querySelectorAll("*")].map((n) => n.tagName.toLowerCase()),
                text: box.textContent,
                pwned: window.mdPwned ?? null,
            };
        }""",
        hostile,
    )
    assert rendered["pwned"] is None
    assert not {"img", "script", "b"} & set(rendered["tags"]), rendered["tags"]
    assert "strong" in rendered["tags"] and "code" in rendered["tags"]  # markdown still rendered
    assert '<img src=x onerror="window.mdPwned=1">' in rendered["text"]
    assert "<b>x</b>" in rendered["text"]


@pytest.mark.slow
def test_the_chat_streams_an_answer_from_another_node_through_this_nodes_api(mesh: Mesh, page: Page) -> None:
    page.goto(mesh.c.console + "/")
    expect(page.locator(f'#chat-model option[value="{SMOLLM}"]')).to_have_count(1, timeout=TIMEOUT_MS)
    page.select_option("#chat-model", SMOLLM)
    page.fill("#chat-max-tokens", "16")  # a short answer: the test waits for the end of the stream
    page.fill("#chat-input", "Say hello.")
    with page.expect_response(lambda r: r.url.endswith("/api/chat"), timeout=TIMEOUT_MS) as answered:
        page.click("#chat-send")
    response = answered.value
    assert response.status == 200, response.text()
    assert response.headers.get("x-mesh-node") == mesh.ids["a"], response.headers  # C routed it to A
    reply = page.locator("#chat-log .msg.assistant").last
    expect(reply).to_have_attribute("data-state", "done", timeout=TIMEOUT_MS)  # the stream ended, not in error
    assert reply.locator(".body").inner_text().strip(), reply.inner_html()
    expect(page.locator("#chat-log .msg.user").last).to_have_text(re.compile("Say hello"))
    screenshot(page, "chat")


STOP_ON_FIRST_TOKEN = """() => {
    // Click Stop the moment the answer shows its first text: the stream is cut mid-answer, not after its end.
    const log = document.getElementById("chat-log");
    new MutationObserver((changes, observer) => {
        const last = log.querySelector(".msg.assistant:last-child");
        if (last && last.dataset.state === "streaming" && last.dataset.raw) {
            observer.disconnect();
            document.getElementById("chat-stop").click();
        }
    }).observe(log, { subtree: true, attributes: true, attributeFilter: ["data-raw"] });
}"""


@pytest.mark.slow
def test_stop_regenerate_and_copy(mesh: Mesh, open_page: OpenPage) -> None:
    page = open_page(permissions=["clipboard-read", "clipboard-write"])
    page.goto(mesh.c.console + "/")
    expect(page.locator(f'#chat-model option[value="{SMOLLM}"]')).to_have_count(1, timeout=TIMEOUT_MS)
    page.select_option("#chat-model", SMOLLM)
    reply = page.locator("#chat-log .msg.assistant").last
    # Stop: a long answer is cut at its first text. A model may end an answer before the click lands (EOS within
    # one chunk): then it asks again, at most three times.
    page.fill("#chat-max-tokens", "400")
    for attempt in range(3):
        page.evaluate(STOP_ON_FIRST_TOKEN)
        page.fill("#chat-input", f"Count from 1 to 300, separated by commas. ({attempt})")
        page.click("#chat-send")
        expect(reply).not_to_have_attribute("data-state", "streaming", timeout=TIMEOUT_MS)
        if reply.get_attribute("data-state") == "stopped":
            break
    expect(reply).to_have_attribute("data-state", "stopped")
    stopped_text = reply.get_attribute("data-raw") or ""
    assert stopped_text, "a stopped answer keeps what had arrived"
    expect(page.locator("#chat-stop")).to_be_disabled()
    assistants = page.locator("#chat-log .msg.assistant").count()

    # Regenerate: the stopped answer is replaced by a new one, asked with the conversation up to the user's message.
    page.fill("#chat-max-tokens", "16")
    with page.expect_request(lambda r: r.url.endswith("/api/chat"), timeout=TIMEOUT_MS) as asked:
        page.click("#chat-regen")
    sent = asked.value.post_data_json
    assert sent["messages"][-1]["role"] == "user" and sent["max_tokens"] == 16, sent
    assert "(" in sent["messages"][-1]["content"]  # the last question, asked again
    expect(reply).to_have_attribute("data-state", "done", timeout=TIMEOUT_MS)
    expect(page.locator("#chat-log .msg.assistant")).to_have_count(assistants)
    answer = reply.get_attribute("data-raw") or ""
    assert answer.strip()

    # Copy: the raw answer (markdown as the model wrote it) lands on the clipboard.
    reply.locator("button.copy").click()
    expect(reply.locator("button.copy")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == answer


@pytest.mark.slow
def test_a_phone_in_dark_mode_gets_a_dark_page_that_fits_its_screen(mesh: Mesh, open_page: OpenPage) -> None:
    page = open_page(viewport={"width": 390, "height": 844}, color_scheme="dark", is_mobile=True)
    page.goto(mesh.c.console + "/")
    expect(page.locator(NODES)).to_have_count(3, timeout=TIMEOUT_MS)
    expect(page.locator(f'#models tr[data-model="{SMOLLM}"]')).to_have_count(1)
    looks = page.evaluate(
        """() => {
            const lum = (c) => {
                const [r, g, b] = c.match(/[0-9.]+/g).map(Number);
                return 0.2126 * r + 0.7152 * g + 0.0722 * b;
            };
            const body = getComputedStyle(document.body);
            return { overflow: document.documentElement.scrollWidth - window.innerWidth,
                     background: lum(body.backgroundColor), text: lum(body.color) };
        }"""
    )
    assert looks["overflow"] <= 0, looks  # nothing wider than the phone: no sideways scrolling
    assert looks["background"] < 80 < looks["text"], looks  # light text on a dark page
    screenshot(page, "phone-dark")


@pytest.mark.slow
def test_a_post_in_one_console_appears_in_another_nodes_feed(mesh: Mesh, open_page: OpenPage) -> None:
    text = "browser test: the feed carries this post across the mesh"
    feed = open_console(open_page, mesh.c)
    expect(feed.locator("#conn")).to_have_attribute("data-state", "live", timeout=TIMEOUT_MS)
    poster = open_console(open_page, mesh.a)
    poster.fill("#board-text", text)
    poster.click("#board-post")
    expect(poster.locator("#board-feed .post .text").filter(has_text=text)).to_have_count(1, timeout=TIMEOUT_MS)
    expect(poster.locator("#board-error")).to_be_hidden()
    expect(feed.locator("#board-feed .post .text").filter(has_text=text)).to_have_count(1, timeout=TIMEOUT_MS)
    screenshot(feed, "blackboard")


@pytest.mark.slow
def test_killing_a_node_updates_the_page_live(mesh: Mesh, page: Page) -> None:
    """Last in the module: B does not come back."""
    page.goto(mesh.c.console + "/")
    b = f'{NODES}[data-node-id="{mesh.ids["b"]}"]'
    expect(page.locator(b)).to_have_count(1, timeout=TIMEOUT_MS)
    expect(page.locator(b)).to_have_attribute("data-state", "alive")
    page.evaluate("window.__sameDocument = true")  # gone if the page reloads
    kill_node(mesh.b)
    b_id = mesh.ids["b"]
    mesh.c.wait_for("C's status: B dead", lambda s: members_of(s).get(b_id, "dead") != "alive", timeout=180)
    # B fades out: marked dead while the mesh still lists it, then gone.
    try:
        page.wait_for_function(
            """(sel) => { const n = document.querySelector(sel); return !n || n.classList.contains("dead"); }""",
            arg=b,
            timeout=TIMEOUT_MS,
        )
    except PlaywrightTimeout as exc:
        shown = page.locator(b).evaluate_all("ns => ns.map((n) => n.outerHTML)")
        raise AssertionError(f"C's status has B dead, its page does not: {shown}") from exc
    assert page.evaluate("window.__sameDocument") is True
    expect(page.locator(NODES)).not_to_have_count(0)
    screenshot(page, "dead-node")
