"""The admin page in-process: sign-in, CSRF, every page full and as a fragment, the actions."""

from __future__ import annotations

import csv
import io
import re
import statistics
import time

import pytest
from litestar.middleware.csrf import generate_csrf_token

from appliance.admin.auth import SESSION_COOKIE
from appliance.store.keys import ApiKey, utcnow
from appliance.store.ledger import Settlement
from tests.admin.conftest import PASSWORD, TINY, AdminClient, flash_error

PAGES = ["/admin/live", "/admin/models", "/admin/keys", "/admin/usage"]


# -- sign-in, sessions, CSRF -----------------------------------------------------------------
@pytest.mark.parametrize("path", [*PAGES, "/admin", "/admin/usage.csv", "/admin/pulls/abc"])
def test_unauthenticated_requests_are_sent_to_sign_in(anon: AdminClient, path: str) -> None:
    response = anon.http.get(path, follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"].startswith("/admin/login")
    if path in PAGES:
        assert response.headers["location"] == f"/admin/login?next={path}"
    # htmx cannot follow a 303 into a page swap: it is told where to go instead.
    response = anon.http.get(
        path,
        headers={"HX-Request": "true", "HX-Current-URL": "http://testserver.local/admin/keys"},
        follow_redirects=False,
    )
    assert response.status_code == 401
    assert response.headers["hx-redirect"] == "/admin/login?next=/admin/keys"


def test_unauthenticated_post_is_refused(anon: AdminClient) -> None:
    response = anon.post("/admin/keys", {"name": "sneaky"}, htmx=False, follow_redirects=False)
    assert response.status_code == 303
    assert anon.call(anon.services.keys.list) == []


def test_wrong_password_is_rejected(anon: AdminClient) -> None:
    response = anon.login("not the password")
    assert response.status_code == 401
    assert "Wrong password" in response.text
    assert SESSION_COOKIE not in response.headers.get("set-cookie", "")
    assert anon.http.get("/admin/keys", follow_redirects=False).status_code == 303


def test_sign_in_sets_a_safe_cookie_and_goes_to_next(anon: AdminClient) -> None:
    response = anon.login(next="/admin/usage?period=24h")
    assert response.status_code == 303
    assert response.headers["location"] == "/admin/usage?period=24h"
    cookie = next(c for c in response.headers.get_list("set-cookie") if SESSION_COOKIE in c)
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Path=/admin" in cookie
    assert anon.http.get("/admin/keys").status_code == 200


@pytest.mark.parametrize("target", ["https://evil.example/admin", "//evil.example", "/v1/models"])
def test_next_never_leaves_the_admin_page(anon: AdminClient, target: str) -> None:
    response = anon.login(next=target)
    assert response.headers["location"] == "/admin"


def test_sign_out_ends_the_session_and_its_copies(admin: AdminClient) -> None:
    stolen = admin.http.cookies.get(SESSION_COOKIE)
    response = admin.post("/admin/logout", {}, htmx=False, follow_redirects=False)
    assert response.status_code == 303
    admin.http.cookies.set(SESSION_COOKIE, stolen or "", domain="testserver.local", path="/admin")
    assert admin.http.get("/admin/keys", follow_redirects=False).status_code == 303


def test_changing_the_password_ends_sessions(admin: AdminClient) -> None:
    admin.call(admin.services.owner.set_admin_password, "a different password")
    assert admin.http.get("/admin/keys", follow_redirects=False).status_code == 303


def test_forged_session_cookie_is_ignored(anon: AdminClient) -> None:
    anon.http.cookies.set(
        SESSION_COOKIE, "eyJkIjogeyJhZG1pbiI6IHRydWV9fQ.AAAA", domain="testserver.local"
    )
    assert anon.http.get("/admin/keys", follow_redirects=False).status_code == 303


def test_posts_without_a_csrf_token_are_403(admin: AdminClient) -> None:
    for path, data in [
        ("/admin/keys", {"name": "x"}),
        ("/admin/models/default", {"model": TINY}),
        ("/admin/logout", {}),
        ("/admin/pulls", {"url": "http://127.0.0.1:1/x.gguf"}),
    ]:
        response = admin.http.post(path, data=data, headers={"HX-Request": "true"})
        assert response.status_code == 403, path
        assert "expired" in response.text and "<html" not in response.text
        bad = admin.http.post(path, data=data, headers={"x-csrftoken": "0" * 128})
        assert bad.status_code == 403
    assert admin.call(admin.services.keys.list) == []
    # The sign-in form is protected too (login CSRF).
    assert admin.http.post("/admin/login", data={"password": PASSWORD}).status_code == 403


def test_a_csrf_cookie_from_another_secret_is_replaced(admin: AdminClient) -> None:
    stale = generate_csrf_token("a secret from an older data directory")
    admin.http.cookies.delete("appliance_csrf")
    admin.http.cookies.set("appliance_csrf", stale, domain="testserver.local", path="/admin")
    refused = admin.http.post("/admin/keys", data={"name": "x"}, headers={"x-csrftoken": stale})
    assert refused.status_code == 403
    assert 'appliance_csrf=""' in refused.headers["set-cookie"]
    admin.http.cookies.delete("appliance_csrf")
    admin.http.get("/admin/keys")  # a reload: a fresh cookie
    assert admin.post("/admin/keys", {"name": "x"}).status_code == 200


def test_api_keys_never_open_the_admin_page(anon: AdminClient) -> None:
    key, _ = anon.call(anon.services.keys.create, "api")
    bearer = {"Authorization": f"Bearer {key}"}
    for path in PAGES:
        response = anon.http.get(path, headers=bearer, follow_redirects=False)
        assert response.status_code == 303, path
    # ... while the API itself needs no CSRF token and still works with the key.
    assert anon.http.get("/v1/models", headers=bearer).status_code == 200
    chat = anon.http.post(
        "/v1/chat/completions",
        json={"model": TINY, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
        headers=bearer,
    )
    assert chat.status_code == 200, chat.text
    assert "appliance_csrf" not in chat.headers.get("set-cookie", "")


# -- pages -------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [*PAGES, "/admin/usage?period=24h", "/admin/usage?period=all"])
def test_each_page_renders_full_and_as_fragment(admin: AdminClient, path: str) -> None:
    full = admin.http.get(path)
    assert full.status_code == 200
    assert full.text.startswith("<!doctype html>") and 'id="main"' in full.text
    assert "htmx.min.js" in full.text and 'hx-headers=\'{"x-csrftoken"' in full.text
    assert "default-src 'self'" in full.headers["content-security-policy"]
    assert full.headers["cache-control"] == "no-store"
    fragment = admin.http.get(path, headers={"HX-Request": "true"})
    assert fragment.status_code == 200
    assert "<html" not in fragment.text and "<title>" in fragment.text
    assert 'hx-swap-oob="true"' in fragment.text  # the nav follows along
    assert "HX-Request" in fragment.headers["vary"]
    restore = admin.http.get(
        path, headers={"HX-Request": "true", "HX-History-Restore-Request": "true"}
    )
    assert restore.text.startswith("<!doctype html>")


def test_page_response_times(admin: AdminClient) -> None:
    admin.call(admin.services.keys.create, "timing")
    _record_usage(admin, "timing", TINY, 100, 20)
    rows = []
    for path in PAGES:
        for htmx in (False, True):
            headers = {"HX-Request": "true"} if htmx else {}
            times = []
            for _ in range(20):
                start = time.perf_counter()
                response = admin.http.get(path, headers=headers)
                times.append((time.perf_counter() - start) * 1000)
                assert response.status_code == 200
            rows.append((path, "fragment" if htmx else "full", statistics.median(times)))
    print("\nadmin page response times (in-process, median of 20 GETs):")
    for path, kind, ms in rows:
        print(f"  {path:<16} {kind:<8} {ms:6.2f} ms")
    assert max(ms for *_, ms in rows) < 250


def test_static_files_are_served_and_cacheable(anon: AdminClient) -> None:
    for name in ("htmx.min.js", "admin.css", "admin.js"):
        response = anon.http.get(f"/admin/static/{name}")
        assert response.status_code == 200, name
        assert "max-age=31536000" in response.headers["cache-control"]
    assert "htmx" in anon.http.get("/admin/static/htmx.min.js").text[:200]


# -- keys --------------------------------------------------------------------------------------
def test_key_plaintext_is_shown_once_and_no_hash_ever(admin: AdminClient) -> None:
    response = admin.post("/admin/keys", {"name": "laptop", "credits": "2.5", "rpm": "30"})
    assert response.status_code == 200, response.text
    shown = re.findall(r'<code id="new-key" class="secret">(apl_\w+)</code>', response.text)
    assert len(shown) == 1
    key = shown[0]
    assert 'data-copy="new-key"' in response.text
    row = admin.call(admin.services.db.fetchone, "SELECT hash FROM keys WHERE name = 'laptop'")
    digest = row["hash"]
    for path in PAGES:
        for headers in ({}, {"HX-Request": "true"}):
            text = admin.http.get(path, headers=headers).text
            assert key not in text, path
            assert digest not in text, path
    keys_page = admin.http.get("/admin/keys").text
    assert "laptop" in keys_page and "30 req/min" in keys_page and key[:12] in keys_page
    summary = admin.call(admin.services.keys.get, "laptop")
    assert str(summary.balance) == "2.5" and summary.rpm == 30
    # The key works against the API.
    ok = admin.http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert ok.status_code == 200


def test_key_limits_top_up_and_revoke(admin: AdminClient) -> None:
    key, _ = admin.call(admin.services.keys.create, "phone")
    # unlimited keys have no balance to top up: a message, not a crash
    refused = admin.post("/admin/keys/topup", {"name": "phone", "amount": "5"})
    assert refused.status_code == 400 and "unlimited" in flash_error(refused.text)
    admin.post("/admin/keys", {"name": "metered", "credits": "1"})
    topped = admin.post("/admin/keys/topup", {"name": "metered", "amount": "2.25"})
    assert topped.status_code == 200 and "3.25" in topped.text
    saved = admin.post(
        "/admin/keys/limits",
        {"name": "phone", "rpm": "5", "tpm": "1000", "concurrency": "2",
         "models": [TINY], "expires": "2099-01-31", "allowance": "0.5", "allowance_period": "day"},
    )  # fmt: skip
    assert saved.status_code == 200, flash_error(saved.text)
    summary = admin.call(admin.services.keys.get, "phone")
    assert (summary.rpm, summary.tpm, summary.concurrency) == (5, 1000, 2)
    assert summary.allowed_models == [TINY]
    assert summary.expires and summary.expires.startswith("2099-01-31")
    assert str(summary.allowance) == "0.5" and summary.allowance_period == "day"
    bearer = {"Authorization": f"Bearer {key}"}
    assert admin.http.get("/v1/models", headers=bearer).status_code == 200
    revoked = admin.post("/admin/keys/revoke", {"name": "phone"})
    assert revoked.status_code == 200 and "Revoked" in revoked.text
    assert admin.http.get("/v1/models", headers=bearer).status_code == 401


@pytest.mark.parametrize(
    ("path", "data", "message"),
    [
        ("/admin/keys", {"name": "a", "rpm": "lots"}, "Requests per minute: expected a whole"),
        ("/admin/keys", {"name": "a", "tpm": "0"}, "Tokens per minute: expected a number of at"),
        ("/admin/keys", {"name": ""}, "Name: expected a value"),
        ("/admin/keys", {"name": "a", "credits": "ten"}, "Credits: not a number"),
        ("/admin/keys", {"name": "a", "expires": "someday"}, "expires is not a date"),
        ("/admin/keys", {"name": "a", "allowance_period": "week"}, "Allowance period"),
        ("/admin/keys/topup", {"name": "nobody", "amount": "1"}, "No key named"),
        ("/admin/keys/topup", {"name": "x", "amount": "1e999999"}, "Amount"),
        ("/admin/keys/revoke", {"name": "nobody"}, "No key named"),
        ("/admin/models/alias", {"model": TINY, "alias": "bad alias!"}, "Alias: expected"),
        ("/admin/models/alias", {"model": "nope", "alias": "ok"}, "no model 'nope'"),
        ("/admin/models/alias/remove", {"alias": "never-made"}, "no alias"),
        ("/admin/models/price", {"model": TINY, "input": "cheap", "output": "1"}, "Input price"),
        ("/admin/models/price", {"model": TINY, "input": "-1", "output": "1"}, "Input price"),
        ("/admin/models/default", {}, "Model: expected a value"),
        ("/admin/pulls", {"url": "ftp://example.com/x.gguf"}, "Only http:// and https://"),
        ("/admin/pulls", {"url": "http://example.com/x.bin"}, "must end with .gguf"),
        ("/admin/pulls", {"url": "http://e.com/x.gguf", "sha256": "abc"}, "64 hexadecimal"),
        ("/admin/pulls", {"url": f"http://e.com/{TINY}.gguf"}, "already in the models"),
    ],
)
def test_bad_form_input_gets_a_friendly_400(
    admin: AdminClient, path: str, data: dict[str, str], message: str
) -> None:
    response = admin.post(path, data)
    assert 400 <= response.status_code < 500, response.text
    assert message.lower() in flash_error(response.text).lower(), response.text
    assert "<form" in response.text  # the page stays usable: the forms come back
    plain = admin.post(path, data, htmx=False)  # without htmx: the whole page
    assert 400 <= plain.status_code < 500 and plain.text.startswith("<!doctype html>")


def test_duplicate_key_name_is_a_message(admin: AdminClient) -> None:
    assert admin.post("/admin/keys", {"name": "dup"}).status_code == 200
    again = admin.post("/admin/keys", {"name": "dup"})
    assert again.status_code == 400 and "already exists" in flash_error(again.text)
    assert "apl_" not in re.sub(r"<code>apl_\w+…</code>", "", again.text)


def test_bad_query_and_unknown_things_are_html_not_500(admin: AdminClient) -> None:
    response = admin.http.get("/admin/usage?period=forever")
    assert response.status_code == 400 and "Unknown period" in response.text
    assert admin.http.get("/admin/usage.csv?period=forever").status_code == 400
    gone = admin.http.get("/admin/pulls/nope", headers={"HX-Request": "true"})
    assert gone.status_code == 200 and gone.text == ""


@pytest.mark.parametrize("path", ["/admin/nope", "/admin/keys/a/b/c"])
def test_unknown_admin_paths_are_an_html_404_and_api_paths_stay_json(
    anon: AdminClient, path: str
) -> None:
    for signed_in in (False, True):
        if signed_in:
            assert anon.login().status_code == 303
        page = anon.http.get(path)
        assert page.status_code == 404, signed_in
        assert page.headers["content-type"].startswith("text/html")
        assert "Not found." in page.text
    admin = anon
    wrong_method = admin.http.delete("/admin/live", headers={"x-csrftoken": admin.csrf})
    assert wrong_method.status_code == 405
    assert wrong_method.headers["content-type"].startswith("text/html")
    api = admin.http.get("/v1/nope")
    assert api.status_code == 404
    assert api.json()["error"]["code"] == "not_found"


# -- usage ---------------------------------------------------------------------------------------
def _record_usage(client: AdminClient, key_name: str, model: str, prompt: int, out: int) -> None:
    summary = client.call(client.services.keys.get, key_name)
    row = client.call(
        client.services.db.fetchone, "SELECT id FROM keys WHERE name = ?", (key_name,)
    )
    key = ApiKey(id=row["id"], name=key_name, prefix=summary.prefix)
    ledger = client.services.ledger
    ticket = client.call(ledger.reserve, key, model, prompt, out)
    settlement = Settlement(
        status="stop", prompt_tokens=prompt, completion_tokens=out, started=utcnow()
    )
    client.call(ledger.settle, ticket, settlement)


def test_usage_per_key_and_model_with_chart_and_csv(admin: AdminClient) -> None:
    admin.call(admin.services.keys.create, "=alice")
    admin.call(admin.services.keys.create, "bob")
    _record_usage(admin, "=alice", TINY, 1000, 200)
    _record_usage(admin, "=alice", "other-model", 10, 5)
    _record_usage(admin, "bob", TINY, 1_000_000, 1_000_000)
    for period in ("24h", "7d", "30d", "all"):
        page = admin.http.get(f"/admin/usage?period={period}")
        assert page.status_code == 200
        assert "=alice" in page.text and "bob" in page.text and "other-model" in page.text
        assert "<svg" in page.text and "bar-completion" in page.text
        assert "1,001,000" in page.text  # prompt tokens of TINY: 1,000 + 1,000,000
    bob = admin.call(admin.services.keys.get, "bob")
    assert str(bob.spent) == "1.2"  # 0.30 + 0.90 credits at the default prices
    response = admin.http.get("/admin/usage.csv?period=7d")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    assert "attachment" in response.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert len(rows) == 3
    assert {r["key"] for r in rows} == {"'=alice", "bob"}  # no formula injection
    assert {r["model"] for r in rows} == {TINY, "other-model"}
    assert sum(int(r["prompt_tokens"]) for r in rows) == 1_001_010
    assert next(r for r in rows if r["key"] == "bob")["cost"] == "1.2"


# -- models ----------------------------------------------------------------------------------------
def test_models_page_shows_header_facts(admin: AdminClient) -> None:
    text = admin.http.get("/admin/models").text
    assert TINY in text and "qwen35" in text  # id and architecture
    assert "F32" in text or "F16" in text  # quantisation from general.file_type
    assert "default" in text and "on disk" in text
    assert "0.3 / 0.9" in text  # default prices


def test_alias_default_price_load_unload(admin: AdminClient) -> None:
    engine = admin.services.engine
    ok = admin.post("/admin/models/alias", {"model": TINY, "alias": "gpt-4o-mini"})
    assert ok.status_code == 200 and "gpt-4o-mini" in ok.text
    assert admin.call(admin.services.owner.get, "aliases") == {"gpt-4o-mini": TINY}
    assert engine.resolve("gpt-4o-mini") == TINY
    gone = admin.post("/admin/models/alias/remove", {"alias": "gpt-4o-mini"})
    assert gone.status_code == 200 and admin.call(admin.services.owner.get, "aliases") == {}
    assert admin.post("/admin/models/default", {"model": TINY}).status_code == 200
    assert admin.call(admin.services.owner.get, "default_model") == TINY
    priced = admin.post("/admin/models/price", {"model": TINY, "input": "1.5", "output": "2"})
    assert priced.status_code == 200
    price = admin.call(admin.services.ledger.price, TINY)
    assert (price.input_per_million, price.output_per_million) == (1_500_000_000, 2_000_000_000)
    loaded = admin.post("/admin/models/load", {"model": TINY})
    assert loaded.status_code == 200 and TINY in engine.status().loaded
    assert "loaded" in loaded.text
    refused = admin.post("/admin/models/delete", {"model": TINY, "confirm": "yes"})
    assert refused.status_code == 400 and "unload it first" in flash_error(refused.text)
    assert admin.post("/admin/models/unload", {"model": TINY}).status_code == 200
    assert engine.status().loaded == []


def test_delete_asks_first_then_removes_the_file(admin: AdminClient) -> None:
    path = admin.services.settings.models_dir / f"{TINY}.gguf"
    asked = admin.post("/admin/models/delete", {"model": TINY})
    assert asked.status_code == 200 and f"Delete {TINY}?" in asked.text
    assert 'name="confirm" value="yes"' in asked.text and path.exists()
    done = admin.post("/admin/models/delete", {"model": TINY, "confirm": "yes"})
    assert done.status_code == 200 and "Deleted" in done.text
    assert not path.exists()
    assert "No models found" in admin.http.get("/admin/models").text


# -- live ------------------------------------------------------------------------------------------
def test_live_page_numbers_and_errors(admin: AdminClient) -> None:
    engine = admin.services.engine
    admin.call(engine.get, TINY)
    stats = engine._loaded[TINY].scheduler.stats  # type: ignore[attr-defined]
    stats.running, stats.queued = 2, 1
    first = admin.http.get("/admin/live", headers={"HX-Request": "true"})
    assert 'hx-trigger="every 2s"' in first.text
    assert re.search(r'id="live-running">2<', first.text) and 'id="live-queued">1<' in first.text
    stats.tokens_generated += 100
    time.sleep(0.6)
    second = admin.http.get("/admin/live", headers={"HX-Request": "true"})
    rate = float(re.search(r'id="live-tps">([\d.]+)<', second.text).group(1))  # type: ignore[union-attr]
    assert 50 < rate < 200
    # A client error is counted; a server error is listed.
    admin.http.get("/v1/models")  # 401
    admin.services.errors.record(500, "POST", "/v1/chat/completions", "engine exploded")
    third = admin.http.get("/admin/live").text
    assert "engine exploded" in third and "401 × 1" in third


def test_loading_progress_on_the_live_and_models_pages(admin: AdminClient) -> None:
    engine = admin.services.engine
    engine.loading = {TINY: 0.42}  # type: ignore[attr-defined]
    live = admin.http.get("/admin/live", headers={"HX-Request": "true"}).text
    assert re.search(rf">{TINY}</th><td colspan=\"6\">Loading \(42 %\)", live), live
    assert "loading 42 %" in admin.http.get("/admin/models").text
    # Shown beside models already serving, too.
    engine.loading = {}  # type: ignore[attr-defined]
    admin.call(engine.get, TINY)
    engine.loading = {"other-model": 0.9}  # type: ignore[attr-defined]
    both = admin.http.get("/admin/live", headers={"HX-Request": "true"}).text
    assert "Loading (90 %)" in both and f">{TINY}</th>" in both
