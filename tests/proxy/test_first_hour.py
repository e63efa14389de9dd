"""A clean first hour: what a new user trips over when starting and calling metergate.

Start-up problems (a Redis that is down or misspelled, a missing rate card
folder, a bad card) are one `metergate: ...` line and a non-zero exit, seen
through a real `metergate serve`; warnings (an upstream key variable unset, the
development keys on a reachable address) through the check `serve` runs.
Then the config traps, `GET /v1/models/{id}`, the 429's `Retry-After`, and an
installed wheel that serves outside the repository.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from pricing.yaml_source import SourceError
from proxy.app import create_app
from proxy.cli import _check_startup
from proxy.config import DEFAULT_CONFIG_PATH, DEV_ADMIN_KEY, DEV_OPERATOR_KEY, load_config
from proxy.store import LimitStore
from proxy.store.keyspace import _limits_key
from tests.conftest import ADMIN
from tests.redis_server import free_port

EXIT_DEADLINE_SECONDS = 20  # the interpreter and the app's imports take a few seconds on a slow machine
WINDOW_MS = 60_000  # key_limits.lua's rate window
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 100}


async def serve_until_exit(repo_root: Path, *, port: int | None = None, **env_vars: str) -> tuple[int, list[str]]:
    """Run `metergate serve` (bundled config, `port` or a free one) and return its exit code and stderr lines."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERGATE_")}
    # The ledger of record goes to the session's file (tests/conftest.py), not into the repository.
    env.update({"OPENAI_API_KEY": "sk-test", "METERGATE_DATABASE_URL": os.environ["METERGATE_DATABASE_URL"], **env_vars})
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--port", str(port or free_port()), cwd=repo_root, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), EXIT_DEADLINE_SECONDS)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"metergate serve was still running after {EXIT_DEADLINE_SECONDS} s") from None
    assert process.returncode is not None
    return process.returncode, stderr.decode().splitlines()


# --------------------------------------------------------------- start-up errors


async def test_an_unreachable_redis_is_one_line_and_exit_1(repo_root):
    port = free_port()  # nothing listens there once the probe socket is closed
    code, lines = await serve_until_exit(repo_root, METERGATE_REDIS_URL=f"redis://:secret@127.0.0.1:{port}/0")
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith(f"metergate: cannot reach Redis at redis://:***@127.0.0.1:{port}/0: "), lines


async def test_a_malformed_redis_url_is_one_line_and_exit_1(repo_root):
    code, lines = await serve_until_exit(repo_root, METERGATE_REDIS_URL="localhost:6379")
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith("metergate: bad redis_url 'localhost:6379': "), lines


async def test_a_missing_rate_card_folder_is_one_line_and_exit_1(repo_root, tmp_path):
    missing = tmp_path / "cards"
    code, lines = await serve_until_exit(repo_root, METERGATE_RATECARDS_DIR=str(missing))
    assert code == 1
    assert lines == [f"metergate: no rate card folder at {missing} (ratecards_dir: {str(missing)!r})"]


async def test_a_bad_card_at_start_is_one_line_naming_its_file_and_line(repo_root, tmp_path):
    cards = tmp_path / "cards"
    shutil.copytree(repo_root / "config" / "ratecards", cards)
    card = cards / "default.yaml"
    card.write_text(card.read_text().replace("\nversion: 1\n", "\nversion: one\n"))
    line = card.read_text().splitlines().index("version: one") + 1
    code, lines = await serve_until_exit(repo_root, METERGATE_RATECARDS_DIR=str(cards))
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith(f"metergate: bad rate card: {card}:{line}: version: "), lines


# --------------------------------------------------------------- start-up warnings


def test_an_unset_upstream_key_variable_is_named_in_a_warning(monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert _check_startup(load_config(environ={})) is None
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("metergate: warning: upstream 'openai': the environment variable OPENAI_API_KEY is not set")


def test_development_keys_on_a_reachable_host_get_a_loud_warning(monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    assert _check_startup(load_config(environ={}, host="0.0.0.0")) is None
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("metergate: warning: !!! INSECURE: serving on 0.0.0.0")
    assert DEV_ADMIN_KEY in line and DEV_OPERATOR_KEY in line


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_development_keys_on_loopback_are_not_warned_about(monkeypatch, capsys, host):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    assert _check_startup(load_config(environ={}, host=host)) is None
    assert capsys.readouterr().err == ""


def test_own_keys_on_a_reachable_host_are_not_warned_about(monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    config = load_config(environ={"METERGATE_ADMIN_KEY": "a-secret", "METERGATE_OPERATOR_KEY": "b-secret"}, host="0.0.0.0")
    assert _check_startup(config) is None
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------- config traps


def test_key_lists_from_the_environment_are_trimmed():
    config = load_config(environ={"METERGATE_ADMIN_KEY": "k1, k2", "METERGATE_OPERATOR_KEY": " o1 ,o2 , "})
    assert (config.admin_keys, config.operator_keys) == (["k1", "k2"], ["o1", "o2"])


async def test_the_second_of_a_spaced_admin_key_list_is_accepted(aiohttp_client, redis_server, redis):
    config = load_config(environ={"METERGATE_ADMIN_KEY": "k1, k2"}, redis_url=redis_server.url)
    client = await aiohttp_client(create_app(config))
    resp = await client.get("/admin/end-users/nobody", headers={"Authorization": "Bearer k2"})
    assert resp.status == 404, await resp.text()  # authenticated; the end user just does not exist


def config_issues(tmp_path: Path, text: str) -> list[tuple[int, str, str]]:
    path = tmp_path / "metergate.yaml"
    path.write_text(text)
    with pytest.raises(SourceError) as err:
        load_config(path, environ={})
    return [(issue.line, issue.field, issue.message) for issue in err.value.issues]


@pytest.mark.parametrize("origin", ["http://localhost:5173/", "https://app.example.com/app", "app.example.com"])
def test_a_cors_origin_that_no_browser_sends_is_refused_at_its_line(tmp_path, origin):
    [(line, field, message)] = config_issues(tmp_path, f'host: 127.0.0.1\ncors_origins:\n  - https://ok.example.com\n  - "{origin}"\n')
    assert (line, field) == (4, "cors_origins.1")
    assert message.startswith("must be an origin like https://app.example.com") and repr(origin) in message


def test_cors_origins_and_the_wildcard_load(tmp_path):
    path = tmp_path / "metergate.yaml"
    path.write_text('cors_origins: ["https://app.example.com", "http://localhost:5173", "*"]\n')
    assert load_config(path, environ={}).cors_origins == ["https://app.example.com", "http://localhost:5173", "*"]


def test_an_upstream_base_url_without_a_scheme_is_refused_at_its_line(tmp_path):
    [(line, field, message)] = config_issues(tmp_path, "upstreams:\n  openai:\n    base_url: api.openai.com/v1\n")
    assert (line, field) == (3, "upstreams.openai.base_url")
    assert message == "must be an http:// or https:// URL with a host, got 'api.openai.com/v1'"


# --------------------------------------------------------------- GET /v1/models/{id}


def sdk(base_url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0)


async def test_models_retrieve_returns_a_model_of_the_callers_card(base_url, make_end_user):
    user = await make_end_user()
    model = await sdk(base_url, user.key).models.retrieve("gpt-4o-mini")
    assert (model.id, model.object, model.owned_by) == ("gpt-4o-mini", "model", "openai")


async def test_models_retrieve_of_an_unknown_model_is_openais_404(base_url, make_end_user):
    user = await make_end_user()
    with pytest.raises(openai.NotFoundError) as err:
        await sdk(base_url, user.key).models.retrieve("gpt-9")
    assert err.value.code == "model_not_found" and err.value.body["param"] == "model"


async def test_models_retrieve_hides_a_model_outside_the_keys_scope(base_url, gateway, make_end_user):
    await make_end_user()
    resp = await gateway.post("/admin/end-users/u_1/keys", json={"name": "web", "models": ["gpt-4o"]}, headers=ADMIN)
    key = (await resp.json())["key"]
    assert (await sdk(base_url, key).models.retrieve("gpt-4o")).id == "gpt-4o"
    with pytest.raises(openai.NotFoundError):
        await sdk(base_url, key).models.retrieve("gpt-4o-mini")


# --------------------------------------------------------------- Retry-After


async def redis_now_ms(redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


def fits(state: tuple[int, int, int], t_ms: int, want: int, limit: int) -> bool:
    """key_limits.lua's admission rule at time t, from its stored (win, current, previous) counts."""
    win, cur, prev = state
    minute = t_ms // WINDOW_MS
    if minute != win:
        cur, prev = 0, cur if minute == win + 1 else 0
    return (prev * (WINDOW_MS - t_ms % WINDOW_MS)) // WINDOW_MS + cur + want <= limit


def true_wait_ms(state: tuple[int, int, int], now_ms: int, want: int, limit: int) -> int:
    """The shortest wait after which the call fits, found by trying every millisecond."""
    return next(d for d in range(1, 2 * WINDOW_MS + 2) if fits(state, now_ms + d, want, limit))


async def stored_counts(redis, key_id: str) -> tuple[int, int, int]:
    win, rq, rq0 = await redis.hmget(_limits_key("u_1", key_id), "win", "rq", "rq0")
    return int(win), int(rq), int(rq0 or 0)


async def test_retry_after_on_a_requests_429_is_the_wait_until_the_call_fits(gateway, make_end_user, redis):
    await make_end_user()
    resp = await gateway.post("/admin/end-users/u_1/keys", json={"name": "web", "requests_per_minute": 2}, headers=ADMIN)
    key = await resp.json()
    headers = {"Authorization": f"Bearer {key['key']}"}
    for _ in range(2):
        assert (await gateway.post("/v1/chat/completions", json=CHAT, headers=headers)).status == 200
    before = await redis_now_ms(redis)
    refused = await gateway.post("/v1/chat/completions", json=CHAT, headers=headers)
    after = await redis_now_ms(redis)
    assert refused.status == 429
    state = await stored_counts(redis, key["id"])
    # The script decided at some moment between `before` and `after`.
    longest, shortest = true_wait_ms(state, before, 1, 2), true_wait_ms(state, after, 1, 2)
    assert math.ceil(shortest / 1000) <= int(refused.headers["Retry-After"]) <= math.ceil(longest / 1000)


async def test_retry_after_counts_the_previous_minute_as_it_fades(redis):
    store = LimitStore(redis)
    key = _limits_key("u_1", "key_1")
    deadline = time.monotonic() + 10
    while True:  # late in a minute the crafted state would already fit: use the next one
        now = await redis_now_ms(redis)
        if now % WINDOW_MS < 55_000:
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)
    # 20 calls last minute, 9 of 10 used this minute: the 10th fits once the
    # previous minute weighs under 1 call, at 57.001 s into this one.
    state = (now // WINDOW_MS, 9, 20)
    await redis.hset(key, mapping={"win": state[0], "rq": 9, "rq0": 20})
    limited = await store.admit("u_1", "key_1", "req_1", requests_per_minute=10, tokens_per_minute=0, tokens=0,
                                max_spend_micros=None, max_daily_spend_micros=None, amount_micros=0)
    after = await redis_now_ms(redis)
    assert limited is not None and limited.what == "requests"
    assert true_wait_ms(state, after, 1, 10) <= limited.retry_after_ms <= true_wait_ms(state, now, 1, 10)


async def test_a_call_larger_than_the_token_limit_gets_no_retry_after(gateway, make_end_user):
    await make_end_user()
    resp = await gateway.post("/admin/end-users/u_1/keys", json={"name": "web", "tokens_per_minute": 50}, headers=ADMIN)
    key = (await resp.json())["key"]
    refused = await gateway.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"})
    body = await refused.json()
    assert refused.status == 429 and body["error"]["code"] == "rate_limit_exceeded"
    assert "Retry-After" not in refused.headers
    assert body["error"]["message"].startswith("Request too large for ")


# --------------------------------------------------------------- the installed wheel


def test_the_checkout_serves_the_documented_config_folder(repo_root):
    assert DEFAULT_CONFIG_PATH.resolve() == repo_root / "config" / "metergate.yaml"


def test_an_installed_wheel_serves_its_bundled_config_outside_the_repository(repo_root, tmp_path):
    source = tmp_path / "src"  # built from a copy: the build leaves build/ and *.egg-info behind
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(repo_root / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("proxy", "pricing", "config"):
        shutil.copytree(repo_root / name, source / name, symlinks=True, ignore=ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", str(source), "-w", str(tmp_path / "dist")],
                   check=True, timeout=120)
    [wheel] = (tmp_path / "dist").glob("metergate-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    subprocess.run([*pip, "--python", str(venv / "bin" / "python"), "install", "--no-deps", "--no-index", str(wheel)],
                   check=True, timeout=120)
    # The dependencies come from the test venv; a plain path line does not run
    # that venv's own .pth files, so its editable `proxy` stays out of sight.
    [site] = (venv / "lib").glob("python*/site-packages")
    (site / "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("METERGATE_", "PYTHON"))}
    metergate = str(venv / "bin" / "metergate")

    version = subprocess.run([metergate, "--version"], cwd=outside, env=env, capture_output=True, text=True, timeout=60)
    assert version.stdout.strip() == "metergate 0.1.0", version.stderr

    port = free_port()
    process = subprocess.Popen([metergate, "serve", "--port", str(port)], cwd=outside, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        status = wait_for_models(port, process)
    finally:
        process.terminate()
        try:
            _, stderr = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
    assert status == 401, stderr  # served: the route answered, and wants a key
    assert "Traceback" not in stderr, stderr
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "from proxy.config import load_config; print(load_config().base_dir)"],
                           cwd=outside, env=env, capture_output=True, text=True, timeout=60)
    assert Path(where.stdout.strip()).is_relative_to(site / "proxy" / "defaults"), where.stderr


def wait_for_models(port: int, process: subprocess.Popen[str]) -> int:
    """The status of GET /v1/models once the service answers (polled with a deadline)."""
    deadline = time.monotonic() + EXIT_DEADLINE_SECONDS
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"metergate serve did not answer (exit code {process.poll()})")
