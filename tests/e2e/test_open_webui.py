"""Open WebUI end to end: the real Open WebUI (pinned release, its own venv, installed the slim
way — see tests/e2e/openwebui_support.py) talks to a real appliance over loopback.

Open WebUI runs offline (``OFFLINE_MODE``, ``HF_HUB_OFFLINE``, slim mode: no embedding model,
no vector DB, no update check) in single-user mode (``WEBUI_AUTH=False``: signing in with
anything yields the admin@localhost token). Its admin settings are given the way an owner
would set them in its Admin Panel, as environment variables:

* ``OPENAI_API_BASE_URL`` / ``OPENAI_API_KEY``: the appliance and one of its keys;
* ``DEFAULT_MODEL_METADATA={"capabilities": {"usage": true, "builtin_tools": false}}``: the
  "Usage" capability makes Open WebUI ask for ``stream_options.include_usage`` and store token
  usage; "Builtin Tools" off keeps its ~20k-token tool catalogue out of a 1k-token context
  (with a real model and a big context, leave it on: the tools go through our tool calling);
* ``TASK_MODEL_EXTERNAL=smollm2`` + ``TASK_MODEL_PARAMS``: background tasks (title, tags,
  follow-ups) run on a small real instruct model, so a title request is visible on our side.

The chat model is the tiny random-weight qwen35moe (tests/support/tiny_qwen35): its output is
byte junk, but it starts inside ``<think>``, so the appliance streams ``reasoning_content``
deltas first and ``content`` after a ``</think>`` — exactly what a real Qwen 3.5 does. A seed
with both parts is searched for (deterministically) before the UI-style chat.

The test skips only when Open WebUI's venv cannot be built (no package registry).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.e2e.openwebui_support import (
    ApplianceServer,
    OpenWebUI,
    OpenWebUIUnavailable,
    appliance_server,
    ensure_openwebui_venv,
    http_json,
    openwebui_server,
)
from tests.helpers import parse_sse
from tests.support.models import smollm2_path
from tests.support.tiny_qwen35 import write_tiny_qwen35

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1800)]

CHAT_MODEL = "tiny-qwen35moe"
TASK_MODEL = "smollm2"
QUESTION = "Why is the sky blue? Answer in one sentence."
MAX_SEEDS = 40
_DETAILS = re.compile(r'<details type="reasoning"[^>]*>(.*?)</details>', re.S)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ApplianceServer, OpenWebUI]]:
    try:
        script = ensure_openwebui_venv()
    except OpenWebUIUnavailable as exc:
        pytest.skip(f"Open WebUI's venv could not be built (needs the package registry): {exc}")
    root = tmp_path_factory.mktemp("openwebui")
    tiny = write_tiny_qwen35(root / f"{CHAT_MODEL}.gguf", moe=True)
    models = {f"{CHAT_MODEL}.gguf": tiny, f"{TASK_MODEL}.gguf": smollm2_path()}
    with (
        appliance_server(
            root / "appliance", models, key_name="open-webui", default_model=CHAT_MODEL
        ) as appliance,
        openwebui_server(
            script,
            root,
            appliance,
            extra_env={
                "DEFAULT_MODEL_METADATA": json.dumps(
                    {"capabilities": {"usage": True, "builtin_tools": False}}
                ),
                "TASK_MODEL_EXTERNAL": TASK_MODEL,
                "TASK_MODEL_PARAMS": json.dumps({"max_tokens": 48, "temperature": 0}),
            },
        ) as webui,
    ):
        status, body = http_json(
            "POST",
            webui.base_url + "/api/v1/auths/signin",
            {"email": "admin@localhost", "password": "admin"},
        )
        assert status == 200, body
        assert body["role"] == "admin"
        webui.token = body["token"]
        yield appliance, webui
        print(f"\n--- Open WebUI log tail ---\n{webui.log_tail(25)}")


def stream_through(webui: OpenWebUI, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream(
        "POST", webui.base_url + "/api/chat/completions", json=body, headers=webui.auth,
        timeout=300,
    ) as response:  # fmt: skip
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        events, done = parse_sse(response.iter_lines())
    assert done, "Open WebUI's stream did not end with [DONE]"
    return events


def fold(events: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"reasoning": "", "content": "", "finish": None, "usage": None}
    for event in events:
        if event.get("usage"):
            out["usage"] = event["usage"]
        for choice in event.get("choices", []):
            delta = choice.get("delta") or {}
            out["reasoning"] += delta.get("reasoning_content") or ""
            out["content"] += delta.get("content") or ""
            out["finish"] = choice.get("finish_reason") or out["finish"]
    return out


def metric(appliance: ApplianceServer, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(appliance.base_url + "/metrics", timeout=30).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_models_are_listed(stack: tuple[ApplianceServer, OpenWebUI]) -> None:
    _, webui = stack
    status, body = webui.get("/api/models")
    assert status == 200, body
    ids = {m["id"] for m in body["data"]}
    assert {CHAT_MODEL, TASK_MODEL} <= ids, ids
    ours = next(m for m in body["data"] if m["id"] == CHAT_MODEL)
    assert ours.get("owned_by") == "openai"  # reached through the OpenAI connection
    print(f"\nOpen WebUI lists: {sorted(ids)}")


def find_seed(webui: OpenWebUI) -> tuple[int, dict[str, Any]]:
    """The first seed whose streamed answer has reasoning and then an answer."""
    for seed in range(MAX_SEEDS):
        events = stream_through(
            webui,
            {
                "model": CHAT_MODEL,
                "stream": True,
                "messages": [{"role": "user", "content": QUESTION}],
                "seed": seed,
                "max_tokens": 160,
            },
        )
        folded = fold(events)
        if folded["reasoning"].strip() and folded["content"].strip():
            return seed, folded
    raise AssertionError(f"no seed below {MAX_SEEDS} gave reasoning and an answer")


def test_chat_completions_stream_through_open_webui(
    stack: tuple[ApplianceServer, OpenWebUI],
) -> None:
    appliance, webui = stack
    before = appliance.keys()[appliance.key_name]
    seed, folded = find_seed(webui)
    print(f"\nseed {seed}: streamed reasoning {folded['reasoning'][:60]!r}... answer "
          f"{folded['content'][:60]!r}... usage {folded['usage']}")  # fmt: skip
    assert folded["finish"] in ("stop", "length")
    # Open WebUI asked for usage (the Usage capability) and passed it on.
    assert folded["usage"] and folded["usage"]["completion_tokens"] > 0
    after = appliance.keys()[appliance.key_name]
    assert after["requests"] > before["requests"]
    assert after["completion_tokens"] > before["completion_tokens"]


def wait_for_chat(webui: OpenWebUI, chat_id: str, message_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 600
    while True:
        status, chat = webui.get(f"/api/v1/chats/{chat_id}")
        assert status == 200, chat
        message = chat["chat"]["history"]["messages"].get(message_id) or {}
        if message.get("done") and chat.get("title") not in (None, "", "New Chat"):
            return dict(chat)
        if message.get("error"):
            raise AssertionError(f"Open WebUI stored an error: {message['error']}")
        if time.monotonic() > deadline:
            raise AssertionError(f"the chat never finished: {json.dumps(chat)[:2000]}")
        time.sleep(0.5)


def ui_turn(webui: OpenWebUI, seed: int) -> tuple[str, str, dict[str, Any]]:
    """What the browser does for a first message: create the chat, then post the turn."""
    status, created = webui.post(
        "/api/v1/chats/new",
        {
            "chat": {
                "title": "New Chat",
                "models": [CHAT_MODEL],
                "params": {},
                "history": {"messages": {}, "currentId": None},
                "messages": [],
                "tags": [],
                "timestamp": int(time.time() * 1000),
            }
        },
    )
    assert status == 200, created
    chat_id = created["id"]
    assert created["title"] == "New Chat"
    user_id, assistant_id = str(uuid.uuid4()), str(uuid.uuid4())
    status, _ = webui.get("/api/models")
    model_item = next(m for m in _["data"] if m["id"] == CHAT_MODEL)
    body = {
        "stream": True,
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": QUESTION}],
        "params": {"seed": seed, "max_tokens": 160},
        "features": {},
        "variables": {},
        "model_item": model_item,
        "session_id": f"sid-{uuid.uuid4().hex[:16]}",
        "chat_id": chat_id,
        "id": assistant_id,
        "parent_id": None,
        "user_message": {
            "id": user_id,
            "parentId": None,
            "childrenIds": [assistant_id],
            "role": "user",
            "content": QUESTION,
            "timestamp": int(time.time()),
            "models": [CHAT_MODEL],
        },
        "background_tasks": {
            "title_generation": True,
            "tags_generation": True,
            "follow_up_generation": True,
        },
    }
    status, answer = webui.post("/api/chat/completions", body)
    assert status == 200, answer
    assert answer.get("status") is True, answer  # the work continues in the background
    return chat_id, assistant_id, answer


def test_ui_chat_stores_answer_reasoning_usage_and_title(
    stack: tuple[ApplianceServer, OpenWebUI],
) -> None:
    appliance, webui = stack
    seed, direct = find_seed(webui)
    tasks_before = metric(appliance, "appliance_requests_total", endpoint="chat",
                          model=TASK_MODEL, status="200")  # fmt: skip
    key_before = appliance.keys()[appliance.key_name]

    chat_id, assistant_id, _ = ui_turn(webui, seed)
    chat = wait_for_chat(webui, chat_id, assistant_id)
    message = chat["chat"]["history"]["messages"][assistant_id]
    content = message.get("content", "")
    # Open WebUI 0.12 keeps the answer in ``content`` and the reasoning as a separate
    # ``output`` item (older releases inlined it as <details type="reasoning">).
    reasoning = [
        part.get("text", "")
        for item in message.get("output") or []
        if item.get("type") == "reasoning"
        for part in item.get("content") or []
    ] + _DETAILS.findall(content)
    answer_text = _DETAILS.sub("", content).strip()
    report = {
        "title": chat["title"],
        "answer (message.content)": answer_text,
        "reasoning (output item of type reasoning)": reasoning,
        "usage (message.usage)": message.get("usage"),
        "output item types": [item.get("type") for item in message.get("output") or []],
        "chat meta": chat.get("meta"),
        "follow-ups": message.get("followUps"),
        "model": message.get("model"),
        "done": message.get("done"),
    }
    print(f"\n=== What Open WebUI stored for the chat (seed {seed}) ===\n"
          f"{json.dumps(report, indent=2, ensure_ascii=True)}")  # fmt: skip

    # The answer and the reasoning are what the appliance streamed, each in its place.
    assert message.get("done") is True
    assert reasoning and "".join(reasoning).strip() == direct["reasoning"].strip(), report
    assert answer_text == direct["content"].strip(), report
    assert direct["reasoning"].strip() not in answer_text
    assert "<think>" not in answer_text and "</think>" not in answer_text
    # Usage is recorded on both sides.
    usage = message.get("usage") or {}
    assert usage.get("completion_tokens", 0) > 0, message
    assert usage.get("prompt_tokens", 0) > 0, message
    key_after = appliance.keys()[appliance.key_name]
    assert key_after["completion_tokens"] - key_before["completion_tokens"] >= usage[
        "completion_tokens"
    ]
    # A title was generated: the task model got requests and the chat was renamed.
    tasks_after = metric(appliance, "appliance_requests_total", endpoint="chat",
                         model=TASK_MODEL, status="200")  # fmt: skip
    print(f"background task requests served by {TASK_MODEL}: {tasks_after - tasks_before:.0f}")
    assert tasks_after > tasks_before, "no background task request reached the appliance"
    assert chat["title"] and chat["title"] != "New Chat"
