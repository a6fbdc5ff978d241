"""Stub of comfy_api.latest._io: same constructor signatures as ComfyUI v0.3.75, minimal behaviour."""
from dataclasses import dataclass, field
from typing import Any


def _prune(d):
    return {k: v for k, v in d.items() if v is not None}


class Input:
    def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, extra_dict=None):
        self.id, self.display_name, self.optional, self.tooltip, self.lazy = id, display_name, optional, tooltip, lazy
        self.io_type = None

    def as_dict(self):
        return _prune({"display_name": self.display_name, "optional": self.optional, "tooltip": self.tooltip})


class WidgetInput(Input):
    def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None,
                 socketless=None, widget_type=None, force_input=None, extra_dict=None):
        super().__init__(id, display_name, optional, tooltip, lazy, extra_dict)
        self.default = default


class Output:
    def __init__(self, id=None, display_name=None, tooltip=None, is_output_list=False):
        self.id, self.display_name, self.tooltip = id, display_name, tooltip
        self.io_type = None


def _make_type(io_type, widget=False, **extra_init):
    class _Type:
        pass

    base = WidgetInput if widget else Input

    class _In(base):
        def __init__(self, id, *args, **kwargs):
            super().__init__(id, *args, **kwargs)
            self.io_type = io_type

    class _Out(Output):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.io_type = io_type

    _Type.Input, _Type.Output, _Type.io_type = _In, _Out, io_type
    return _Type


class Int:
    io_type = "INT"

    class Input(WidgetInput):
        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None, min=None,
                     max=None, step=None, control_after_generate=None, display_mode=None, socketless=None,
                     force_input=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)
            self.min, self.max, self.step, self.control_after_generate = min, max, step, control_after_generate
            self.io_type = "INT"

    Output = _make_type("INT").Output


class Float:
    io_type = "FLOAT"

    class Input(WidgetInput):
        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None, min=None,
                     max=None, step=None, round=None, display_mode=None, socketless=None, force_input=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)
            self.min, self.max, self.step = min, max, step
            self.io_type = "FLOAT"

    Output = _make_type("FLOAT").Output


class Boolean:
    io_type = "BOOLEAN"

    class Input(WidgetInput):
        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None,
                     label_on=None, label_off=None, socketless=None, force_input=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)
            self.io_type = "BOOLEAN"

    Output = _make_type("BOOLEAN").Output


class String:
    io_type = "STRING"

    class Input(WidgetInput):
        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, multiline=False,
                     placeholder=None, default=None, dynamic_prompts=None, socketless=None, force_input=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)
            self.multiline = multiline
            self.io_type = "STRING"

    Output = _make_type("STRING").Output


class Combo:
    io_type = "COMBO"

    class Input(WidgetInput):
        def __init__(self, id, options=None, display_name=None, optional=False, tooltip=None, lazy=None,
                     default=None, control_after_generate=None, upload=None, image_folder=None, remote=None,
                     socketless=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless)
            self.options = list(options or [])
            self.io_type = "COMBO"

    Output = _make_type("COMBO").Output


Image = _make_type("IMAGE")
Mask = _make_type("MASK")
Model = _make_type("MODEL")
Vae = _make_type("VAE")


def Custom(io_type):
    return _make_type(io_type)


class Hidden:
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"


@dataclass
class Schema:
    node_id: str
    display_name: str = None
    category: str = "sd"
    inputs: list = None
    outputs: list = None
    hidden: list = None
    description: str = ""
    is_input_list: bool = False
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False
    is_api_node: bool = False
    not_idempotent: bool = False
    enable_expand: bool = False


class NodeOutput:
    def __init__(self, *args, ui=None, expand=None, block_execution=None):
        self.args, self.ui = args, ui

    @property
    def result(self):
        return self.args if self.args else None


class ComfyNode:
    @classmethod
    def define_schema(cls):
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs):
        raise NotImplementedError
