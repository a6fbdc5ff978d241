"""Checks every node runs on its own choice and file-name inputs.

ComfyUI v0.3.75 compares V1 combo values with their lists but not V3 ones (a workflow's ``dtype
"fp64"`` reaches the node), and it never checks that a file name stays inside a model folder. So each
node declares its choices and model-folder inputs once, refuses bad values in ``validate_inputs``
(POST /prompt answers with the message before anything runs) and again at the start of ``execute``
(direct calls, and values that arrive over a link).
"""

from __future__ import annotations

from typing import Mapping, Sequence

from . import comfy_bridge as bridge


class InputError(ValueError):
    """A choice input whose value is not one of its options."""


def check_choice(where: str, value: object, options: Sequence[str]) -> None:
    if value not in options:
        raise InputError(f"{where}: {value!r} is not one of {', '.join(options)}")


def check_inputs(node_id: str, values: Mapping[str, object], choices: Mapping[str, Sequence[str]] = {},
                 model_names: Mapping[str, str] = {}) -> None:
    """Raise a ValueError naming the node and input for the first bad value. ``choices``: input -> options;
    ``model_names``: input -> model folder whose registered paths its file name must stay inside.
    Inputs absent from ``values`` are not checked."""
    for input_name, options in choices.items():
        if input_name in values:
            check_choice(f"{node_id} {input_name}", values[input_name], options)
    for input_name, folder in model_names.items():
        if input_name in values:
            bridge.check_model_name(folder, values[input_name], f"{node_id} {input_name}")


def validation_result(node_id: str, values: Mapping[str, object], choices: Mapping[str, Sequence[str]] = {},
                      model_names: Mapping[str, str] = {}) -> bool | str:
    """``validate_inputs``' answer: True, or the message ComfyUI shows when it refuses the prompt. None
    values are skipped: ComfyUI passes None for an input linked from another node (not known yet)."""
    known = {name: value for name, value in values.items() if value is not None}
    try:
        check_inputs(node_id, known, choices, model_names)
    except ValueError as exc:
        return str(exc)
    return True
