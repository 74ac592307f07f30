import asyncio

from starlette.datastructures import Headers

from plugins.params import Params, ParamsConfig, ParamsRule
from proxy.pipeline import Call, Reply


def test_rules_apply_by_model_pattern():
    plugin = Params(
        ParamsConfig(rules=[
            ParamsRule(models=["gpt-*"], defaults={"temperature": 0.2}, overrides={"user": "gw"},
                       max_tokens=100, remove=["logit_bias"]),
        ]),
        context=None,
    )  # fmt: skip
    seen = []

    async def terminal(call):
        seen.append(dict(call.body))
        return Reply.json({})

    body = {"model": "gpt-x", "messages": [], "max_tokens": 500, "logit_bias": {"1": 2}}
    asyncio.run(plugin(Call("chat", body, Headers(), "r"), terminal))
    asyncio.run(plugin(Call("chat", {"model": "other", "messages": []}, Headers(), "r"), terminal))
    assert seen[0] == {"model": "gpt-x", "messages": [], "max_tokens": 100,
                       "temperature": 0.2, "user": "gw"}  # fmt: skip
    assert seen[1] == {"model": "other", "messages": []}
