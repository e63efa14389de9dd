"""How the Lua scripts are assembled: each gets the prelude's definitions it uses, and only those."""

from __future__ import annotations

import redis.asyncio as aioredis

from proxy.store.scripts import _DEFINITION, SCRIPT_NAMES, Prelude, _scripts, lua_code, lua_names

PRELUDE = """-- header
local MAX = 10
-- helper a
local function a(x)
  return x + MAX
end
-- b uses a
local function b(x)
  return a(x) * 2
end
-- c is never used, though a comment names b
local function c()
  return 'b -- not a call'
end
"""


def test_a_script_gets_what_it_calls_and_what_that_calls():
    prelude = Prelude(PRELUDE)
    assert prelude.needed_by("return b(1)") == {"b", "a", "MAX"}


def test_a_name_only_in_a_comment_pulls_in_nothing():
    prelude = Prelude(PRELUDE)
    assert prelude.needed_by("-- c() would be wrong here\nreturn a(1)") == {"a", "MAX"}


def test_definitions_keep_the_prelude_order():
    source = Prelude(PRELUDE).for_script("return b(1)")
    assert source.index("local MAX") < source.index("local function a") < source.index("local function b")
    assert "local function c" not in source
    assert source.startswith("-- header\n")


def test_dashes_inside_a_string_do_not_start_a_comment():
    assert "f" in lua_names("local s = 'a--b' .. f(1) -- g(2)")
    assert "g" not in lua_names("local s = 'a--b' .. f(1) -- g(2)")
    assert lua_code('x = "it\\"s -- here" -- gone') == 'x = "it\\"s -- here" '


def test_every_script_defines_every_prelude_name_its_code_uses():
    scripts = _scripts()
    full = Prelude(open(_prelude_path()).read())
    for name in SCRIPT_NAMES:
        source = scripts.source[name]
        defined = set(_DEFINITION.findall(source))
        missing = (lua_names(source) & full.names) - defined
        assert not missing, f"{name}.lua uses {sorted(missing)} without their definitions"


def test_the_hold_script_leaves_out_what_only_refunds_and_top_ups_use():
    source = _scripts().source["hold"]
    assert "local function grants_refund" not in source
    assert "local function balance_op_finish" not in source
    assert "local function grants_sweep" in source  # a hold expires due grants first


async def test_every_script_compiles_in_redis(redis: aioredis.Redis):
    scripts = _scripts()
    for name in SCRIPT_NAMES:
        assert await redis.script_load(scripts.source[name]) == scripts.sha[name]


def _prelude_path() -> str:
    from importlib import resources

    return str(resources.files("proxy") / "lua" / "_prelude.lua")
