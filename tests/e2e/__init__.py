"""End-to-end harness: a real ComfyUI (comfy_env), its server (server), UI->API conversion (ui_to_api).

Standard library only; nothing here is imported by the pack. The tests are tests/test_e2e_comfy.py.
"""
