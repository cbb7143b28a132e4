"""A test-only ComfyUI custom node pack, loaded beside this pack by a test server (never by users).

* Node ``InstantFamilyTestStandInStyle`` (MODEL, weight → MODEL): another IPAdapter-style pack's node, the stand-in
  of ``support/standin_attn2.py``; each call of its callback is counted.
* Route ``GET /instantfamily_test/standin`` → ``{"calls": n, "clone_rule": rule}``: the callback calls so far.
* With ``INSTANTFAMILY_TEST_CLONE_RULE=0.38`` in the environment, ``ModelPatcher.clone()`` copies
  ``model_options`` as ComfyUI 0.38 does (``support/clone_rules.py``) for the whole server.
"""

import os
import sys

TESTS = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))  # through the link
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

from aiohttp import web  # noqa: E402
from server import PromptServer  # noqa: E402

from support.clone_rules import install_clone_rule_038  # noqa: E402
from support.standin_attn2 import StyleTokens, standin_apply  # noqa: E402

CLONE_RULE = os.environ.get("INSTANTFAMILY_TEST_CLONE_RULE", "0.3.64")
if CLONE_RULE == "0.38":
    install_clone_rule_038()

CALLS = {"n": 0}


class CountedStyle(StyleTokens):
    def __call__(self, out, q, k, v, extra_options, **kwargs):
        CALLS["n"] += 1
        return super().__call__(out, q, k, v, extra_options, **kwargs)


class StandInStyle:
    CATEGORY = "testing"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "weight": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 2.0})}}

    def apply(self, model, weight):
        return (standin_apply(model, CountedStyle(weight=weight)),)


@PromptServer.instance.routes.get("/instantfamily_test/standin")
async def standin_calls(request):
    return web.json_response({"calls": CALLS["n"], "clone_rule": CLONE_RULE})


NODE_CLASS_MAPPINGS = {"InstantFamilyTestStandInStyle": StandInStyle}
