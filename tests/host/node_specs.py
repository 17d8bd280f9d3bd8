"""Node input specs as both host APIs report them, reduced to what a user sees: the V1 form
`(type or [options], {options})` and the V3 form `("COMBO", {"options": [...], "multiselect": False})`
compare equal when they declare the same input."""


def plain_spec(spec, with_options=True):
    """(type, combo options or None, widget options) of one input spec; with_options=False drops
    the combo's option list (file lists differ between processes with other model folders)."""
    kind, options = spec[0], dict(spec[1]) if len(spec) > 1 else {}
    choices = None
    if isinstance(kind, (list, tuple)):
        kind, choices = "COMBO", list(kind)
    elif kind == "COMBO":
        choices = options.pop("options")
        assert options.pop("multiselect", False) is False
    if kind == "STRING":
        options.setdefault("multiline", False)
    return kind, (choices if with_options else None), options


def plain_inputs(declared, with_options=True):
    """{section: {input name: plain_spec}} of an INPUT_TYPES dict or an /object_info "input" entry,
    hidden inputs left out (the host adds prompt/extra_pnginfo to V3 output nodes itself)."""
    return {section: {name: plain_spec(spec, with_options) for name, spec in declared.get(section, {}).items()}
            for section in ("required", "optional")}


def combo_options(spec):
    """The option list of a combo input in either form."""
    return plain_spec(spec)[1]
