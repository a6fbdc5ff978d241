"""The e2e harness's own pieces that need no server: log parsing, websocket framing, requirements."""

import json
import struct

from e2e.comfy_env import SKIPPED_REQUIREMENTS, _requirement_name
from e2e.server import ComfyServer, WebSocket, format_rejection

# what ComfyUI v0.3.75 logs when a pack's __init__ raises (paths shortened)
BROKEN_LOG = """\
Device: cpu
Traceback (most recent call last):
  File "/c/ComfyUI/nodes.py", line 2146, in load_custom_node
    module_spec.loader.exec_module(module)
  File "/w/base/custom_nodes/comfyui-diffuseit-blended/__init__.py", line 1, in <module>
    import nope
ModuleNotFoundError: No module named 'nope'

Cannot import /w/base/custom_nodes/comfyui-diffuseit-blended module for custom nodes: No module named 'nope'

Import times for custom nodes:
   0.0 seconds: /w/base/custom_nodes/other_pack
   0.0 seconds (IMPORT FAILED): /w/base/custom_nodes/comfyui-diffuseit-blended
"""


def test_import_errors_are_found_in_the_log(tmp_path):
    server = ComfyServer("/nonexistent", "/nonexistent/python", tmp_path, workdir=tmp_path)
    server.log_path.write_text(BROKEN_LOG)
    errors = server.pack_import_errors()
    assert len(errors) == 2
    assert errors[0].startswith("Traceback") and "No module named 'nope'" in errors[0]
    assert "IMPORT FAILED" in errors[1]
    server.log_path.write_text(BROKEN_LOG.replace("comfyui-diffuseit-blended", "someone_else"))
    assert server.pack_import_errors() == []


def _frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    head += bytes([n]) if n < 126 else bytes([126]) + struct.pack(">H", n)
    return head + payload


def test_websocket_reassembles_fragmented_and_long_messages():
    ws = WebSocket.__new__(WebSocket)
    ws.closed, ws._partial = False, None
    text = json.dumps({"type": "progress", "data": {"value": 1, "max": 6}}).encode()
    blob = b"\x00\x00\x00\x04" + b"x" * 300
    ws.buffer = _frame(0x1, text[:10], fin=False) + _frame(0x0, text[10:]) + _frame(0x2, blob)
    assert ws.recv(0) == (0x1, text)
    assert ws.recv(0) == (0x2, blob)
    assert ws.recv(0) is None


def test_requirement_filter_keeps_what_the_server_needs():
    lines = ["comfyui-frontend-package==1.32.9", "comfyui-workflow-templates==0.7.25", "torch", "torchvision",
             "torchaudio", "numpy>=1.25.0", "#non essential dependencies:", "pydantic~=2.0", ""]
    kept = [ln for ln in lines if _requirement_name(ln) not in SKIPPED_REQUIREMENTS]
    assert kept == ["comfyui-frontend-package==1.32.9", "numpy>=1.25.0", "#non essential dependencies:",
                    "pydantic~=2.0", ""]


def test_rejections_are_readable():
    body = {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation"},
            "node_errors": {"2": {"class_type": "LoadDDPM", "errors": [
                {"message": "Value not in list", "details": "ckpt_name: 'x.pt' not in []"}]}}}
    text = format_rejection(body)
    assert "node 2 (LoadDDPM): Value not in list" in text and "x.pt" in text
