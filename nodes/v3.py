"""The plugin's nodes as V3 nodes (comfy_api.latest), for hosts that have the V3 API.

Each node is declared once, by its V1 class attributes (INPUT_TYPES, RETURN_TYPES, RETURN_NAMES,
OUTPUT_TOOLTIPS, FUNCTION, OUTPUT_NODE, CATEGORY, DESCRIPTION, IS_CHANGED, VALIDATE_INPUTS). This
module reads that declaration into an io.Schema and runs the V1 node's FUNCTION from execute(), so
the 2024 host (V1 only) and current hosts (V3) serve the same node ids, inputs and defaults.
Only imported where compat.V3_IO exists.
"""
import inspect

from . import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .compat import V3_IO as io
from .compat import V3Extension

WIDGET_TYPES = {"INT": "Int", "FLOAT": "Float", "STRING": "String", "BOOLEAN": "Boolean"}
# V1 option names whose V3 constructor argument is spelled differently
V3_ARGUMENT = {"dynamicPrompts": "dynamic_prompts", "forceInput": "force_input"}


def v3_input(name, spec, optional):
    """The io.*.Input of one V1 input spec `(type or options, {options})`. Options the V3 class
    takes as arguments become arguments; the rest ride in extra_dict, which V3 reports as given."""
    kind, options = spec[0], dict(spec[1]) if len(spec) > 1 else {}
    arguments = {}
    if isinstance(kind, (list, tuple)):
        input_class, arguments["options"] = io.Combo.Input, list(kind)
    elif kind in WIDGET_TYPES:
        input_class = getattr(io, WIDGET_TYPES[kind]).Input
    else:
        input_class = io.Custom(kind).Input
    accepted = inspect.signature(input_class.__init__).parameters
    extra = {}
    for key, value in options.items():
        argument = V3_ARGUMENT.get(key, key)
        if argument in accepted:
            arguments[argument] = value
        else:
            extra[key] = value
    v3 = input_class(name, optional=optional, **arguments)
    v3.extra_dict.update(extra)
    return v3


def hidden_inputs(v1):
    """{argument name: io.Hidden} of the V1 node's hidden inputs (e.g. unique_id: UNIQUE_ID)."""
    return {name: io.Hidden(spec[0] if isinstance(spec, (list, tuple)) else spec)
            for name, spec in v1.INPUT_TYPES().get("hidden", {}).items()}


def schema_of(node_id, v1, display_name):
    declared = v1.INPUT_TYPES()
    inputs = [v3_input(name, spec, optional)
              for section, optional in (("required", False), ("optional", True))
              for name, spec in declared.get(section, {}).items()]
    names = getattr(v1, "RETURN_NAMES", None) or v1.RETURN_TYPES
    tooltips = getattr(v1, "OUTPUT_TOOLTIPS", None) or (None,) * len(v1.RETURN_TYPES)
    outputs = [io.Custom(kind).Output(display_name=name, tooltip=tooltip)
               for kind, name, tooltip in zip(v1.RETURN_TYPES, names, tooltips)]
    return io.Schema(node_id=node_id, display_name=display_name, category=v1.CATEGORY,
                     description=getattr(v1, "DESCRIPTION", ""), inputs=inputs, outputs=outputs,
                     hidden=list(hidden_inputs(v1).values()), is_output_node=getattr(v1, "OUTPUT_NODE", False))


def node_output(result):
    """A V1 return value (a tuple, or {"ui": ..., "result": ...}) as io.NodeOutput."""
    if isinstance(result, dict):
        return io.NodeOutput(*result.get("result", ()), ui=result.get("ui"))
    return io.NodeOutput(*result)


def combo_names(v1):
    declared = v1.INPUT_TYPES()
    return [name for section in ("required", "optional") for name, spec in declared.get(section, {}).items()
            if isinstance(spec[0], (list, tuple))]


def validate_inputs_of(v1):
    """validate_inputs checking every combo value against its options, then the V1 node's own
    VALIDATE_INPUTS. Its signature names the combo inputs and VALIDATE_INPUTS' arguments: the host
    passes exactly those and keeps its own checks of every other input. (v0.3.64 checks combo
    values of V1 nodes only, execution.py validate_inputs; 0.38 checks both.)"""
    own = getattr(v1, "VALIDATE_INPUTS", None)
    own_arguments = inspect.getfullargspec(own).args[1:] if own is not None else []
    names = list(dict.fromkeys(combo_names(v1) + own_arguments))

    def validate_inputs(cls, **inputs):
        declared = v1.INPUT_TYPES()
        for name in combo_names(v1):
            options = {**declared.get("required", {}), **declared.get("optional", {})}[name][0]
            if inputs.get(name) is not None and inputs[name] not in options:
                return f"{name}: '{inputs[name]}' is not one of the {len(options)} options"
        return own(**{name: inputs[name] for name in own_arguments if name in inputs}) if own is not None else True

    validate_inputs.__signature__ = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in ["cls", *names]])
    return validate_inputs


def v3_node(node_id, v1, display_name):
    """An io.ComfyNode class that declares `v1`'s schema and runs its FUNCTION."""
    def define_schema(cls):
        return schema_of(node_id, v1, display_name)

    def execute(cls, **inputs):
        hidden = {name: getattr(cls.hidden, kind.name) for name, kind in hidden_inputs(v1).items()}
        return node_output(getattr(v1(), v1.FUNCTION)(**inputs, **hidden))

    def fingerprint_inputs(cls, **inputs):
        return v1.IS_CHANGED(**inputs)

    methods = {"define_schema": classmethod(define_schema), "execute": classmethod(execute),
               "__doc__": v1.__doc__, "V1_CLASS": v1}
    if hasattr(v1, "IS_CHANGED"):
        methods["fingerprint_inputs"] = classmethod(fingerprint_inputs)
    if hasattr(v1, "VALIDATE_INPUTS") or combo_names(v1):
        methods["validate_inputs"] = classmethod(validate_inputs_of(v1))
    return type(v1.__name__, (io.ComfyNode,), methods)


def v3_nodes(class_mappings, display_names):
    return [v3_node(node_id, v1, display_names[node_id]) for node_id, v1 in class_mappings.items()]


class MixOfShowExtension(V3Extension):
    async def get_node_list(self):
        return v3_nodes(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS)


async def comfy_entrypoint():
    return MixOfShowExtension()
