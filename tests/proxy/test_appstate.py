"""`app_state(request)` answers what `request.config_dict` does, on root and sub-application routes."""

from __future__ import annotations

from aiohttp import web

from proxy.appstate import app_state

SHARED = web.AppKey("shared", str)  # on both apps: the sub-application's shadows the root's
ROOT_ONLY = web.AppKey("root_only", str)
SUB_ONLY = web.AppKey("sub_only", str)


def _seen(request: web.Request) -> dict[str, object]:
    state, chain = app_state(request), request.config_dict
    return {
        "shared": state[SHARED], "root_only": state[ROOT_ONLY], "sub_only": state.get(SUB_ONLY, "-"),
        "same_as_config_dict": [state[SHARED], state[ROOT_ONLY], state.get(SUB_ONLY, "-"), SUB_ONLY in state]
        == [chain[SHARED], chain[ROOT_ONLY], chain.get(SUB_ONLY, "-"), SUB_ONLY in chain],
    }


async def _handler(request: web.Request) -> web.Response:
    return web.json_response(_seen(request))


def _apps() -> web.Application:
    root, sub = web.Application(), web.Application()
    root[SHARED], root[ROOT_ONLY] = "root", "root"
    sub[SHARED], sub[SUB_ONLY] = "sub", "sub"
    root.router.add_get("/here", _handler)
    sub.router.add_get("/there", _handler)
    root.add_subapp("/sub", sub)
    return root


async def test_a_root_route_reads_the_root_apps_state(aiohttp_client):
    client = await aiohttp_client(_apps())
    seen = await (await client.get("/here")).json()
    assert seen == {"shared": "root", "root_only": "root", "sub_only": "-", "same_as_config_dict": True}


async def test_a_sub_application_route_reads_its_own_state_then_the_roots(aiohttp_client):
    client = await aiohttp_client(_apps())
    seen = await (await client.get("/sub/there")).json()
    assert seen == {"shared": "sub", "root_only": "root", "sub_only": "sub", "same_as_config_dict": True}
