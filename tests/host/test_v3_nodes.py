"""V3 nodes (comfy_api.latest) generated from each node's one V1 declaration, in process.

On a host with the V3 API the package offers comfy_entrypoint() and no NODE_CLASS_MAPPINGS (the
host would load the V1 mapping first); on the 2024 host it offers the V1 mapping only. The V3
schema of every node is checked against its V1 declaration, and the generated execute(),
fingerprint_inputs() and validate_inputs() against a small V1 node written here."""
import asyncio
import inspect
import sys

import pytest

from comfyui_mixofshow.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from comfyui_mixofshow.nodes.compat import V3_IO as io

from .node_specs import plain_inputs

PLUGIN = sys.modules["comfyui_mixofshow"]
needs_v3 = pytest.mark.skipif(io is None, reason="the 2024 host has no V3 node API")


def v3_classes():
    extension = asyncio.run(PLUGIN.comfy_entrypoint())
    return {node.GET_SCHEMA().node_id: node for node in asyncio.run(extension.get_node_list())}


def test_package_offers_exactly_one_registration():
    if io is None:
        assert PLUGIN.NODE_CLASS_MAPPINGS is NODE_CLASS_MAPPINGS
        assert PLUGIN.NODE_DISPLAY_NAME_MAPPINGS == NODE_DISPLAY_NAME_MAPPINGS
        assert not hasattr(PLUGIN, "comfy_entrypoint")
    else:
        assert not hasattr(PLUGIN, "NODE_CLASS_MAPPINGS")
        assert isinstance(asyncio.run(PLUGIN.comfy_entrypoint()), PLUGIN.nodes.compat.V3Extension)


@needs_v3
def test_every_v3_schema_declares_the_v1_inputs_outputs_and_names():
    classes = v3_classes()
    assert list(classes) == list(NODE_CLASS_MAPPINGS)
    for node_id, v1 in NODE_CLASS_MAPPINGS.items():
        info = classes[node_id].GET_NODE_INFO_V1()
        declared = v1.INPUT_TYPES()
        assert plain_inputs(info["input"]) == plain_inputs(declared), node_id
        for section in ("required", "optional"):  # input order is the widget order of saved workflows
            assert list(info["input"].get(section, {})) == list(declared.get(section, {})), node_id
        assert info["output"] == list(v1.RETURN_TYPES), node_id
        assert info["output_name"] == list(getattr(v1, "RETURN_NAMES", v1.RETURN_TYPES)), node_id
        assert info["output_tooltips"] == list(getattr(v1, "OUTPUT_TOOLTIPS", [None] * len(v1.RETURN_TYPES)))
        assert (info["display_name"], info["category"], info["description"], info["output_node"]) == (
            NODE_DISPLAY_NAME_MAPPINGS[node_id], v1.CATEGORY, v1.DESCRIPTION, getattr(v1, "OUTPUT_NODE", False))
        assert (first_override(classes[node_id], "fingerprint_inputs") is not None) == hasattr(v1, "IS_CHANGED")


def first_override(v3, name):
    from comfy_api.internal import first_real_override
    return first_real_override(v3, name)


class Echo:
    """A V1 node using what the generator supports: a hidden input, a UI result, IS_CHANGED and
    VALIDATE_INPUTS with named arguments."""
    CATEGORY = "test"
    DESCRIPTION = "Echoes its text with the node id."
    RETURN_TYPES = ("STRING",)
    FUNCTION = "run"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": "a"}), "repeat": ("INT", {"default": 1, "min": 1})},
                "optional": {"mode": (["plain", "loud"],)},
                "hidden": {"node": "UNIQUE_ID"}}

    @classmethod
    def IS_CHANGED(cls, text, **kwargs):
        return f"changed:{text}"

    @classmethod
    def VALIDATE_INPUTS(cls, repeat):
        return True if repeat < 5 else "repeat: at most 4"

    def run(self, text, repeat, node, mode="plain"):
        text = text.upper() if mode == "loud" else text
        return {"ui": {"text": [node]}, "result": (text * repeat + node,)}


@needs_v3
def test_execute_runs_the_v1_function_with_hidden_inputs_and_ui():
    from comfyui_mixofshow.nodes.v3 import v3_node
    node = v3_node("TestEcho", Echo, "Echo")
    assert node.GET_SCHEMA().hidden[0] == io.Hidden.unique_id

    class Running(node):  # what the executor's class clone carries
        hidden = io.HiddenHolder.from_dict({io.Hidden.unique_id: "17"})

    output = Running.EXECUTE_NORMALIZED(text="ab", repeat=2)
    assert isinstance(output, io.NodeOutput)
    assert output.args == ("abab17",) and output.ui == {"text": ["17"]}
    assert node.fingerprint_inputs(text="x", repeat=3) == "changed:x"
    assert Running.EXECUTE_NORMALIZED(text="ab", repeat=1, mode="loud").args == ("AB17",)
    validate = first_override(node, "validate_inputs")
    # the host passes these inputs only (and checks every other input itself)
    assert inspect.getfullargspec(validate).args == ["cls", "mode", "repeat"]
    assert validate(repeat=2) is True and validate(repeat=9) == "repeat: at most 4"
    assert validate(mode="loud", repeat=2) is True and validate(mode=None, repeat=2) is True  # None: a link
    assert validate(mode="quiet", repeat=2) == "mode: 'quiet' is not one of the 2 options"


@needs_v3
def test_v3_widget_classes_carry_the_v1_options():
    from comfyui_mixofshow.nodes.v3 import v3_input
    text = v3_input("prompt", ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "x"}), False)
    assert isinstance(text, io.String.Input) and text.multiline and text.dynamic_prompts and text.default == "x"
    box = v3_input("bounding_box", ("BOUNDING_BOX", {"forceInput": True, "tooltip": "t"}), True)
    assert box.get_io_type() == "BOUNDING_BOX" and box.optional
    assert box.as_dict()["forceInput"] is True and box.as_dict()["tooltip"] == "t"
    units = v3_input("units", (["normalized", "pixels"], {"default": "pixels"}), False)
    assert isinstance(units, io.Combo.Input) and units.options == ["normalized", "pixels"] and units.default == "pixels"
