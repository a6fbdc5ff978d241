"""End-to-end harness: a real ComfyUI (comfy_env), its server (server), UI->API conversion (ui_to_api),
workflows as fast prompts for the tiny models (prompts), back-to-back runs with the server's memory (soak).

Standard library only (prompts' test pictures need numpy and Pillow); nothing here is imported by the
pack. The tests are tests/test_e2e_comfy.py; bench/soak_comfy.py is the long soak.
"""
