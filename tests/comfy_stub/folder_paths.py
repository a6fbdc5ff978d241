"""Stub of ComfyUI's folder_paths with the same data structure (name -> ([paths], {extensions}))."""
import os
import tempfile

models_dir = os.environ.get("STUB_COMFY_MODELS", os.path.join(tempfile.gettempdir(), "stub_comfy_models"))
folder_names_and_paths: dict = {}


def add_model_folder_path(folder_name, full_folder_path, is_default=False):
    paths, exts = folder_names_and_paths.setdefault(folder_name, ([], set()))
    if full_folder_path not in paths:
        paths.insert(0, full_folder_path) if is_default else paths.append(full_folder_path)


def get_folder_paths(folder_name):
    return list(folder_names_and_paths[folder_name][0])


def get_filename_list(folder_name):
    paths, exts = folder_names_and_paths[folder_name]
    out = []
    for p in paths:
        if os.path.isdir(p):
            for root, _, files in os.walk(p):
                for f in files:
                    if not exts or os.path.splitext(f)[1] in exts:
                        out.append(os.path.relpath(os.path.join(root, f), p))
    return sorted(set(out))


def get_full_path(folder_name, filename):
    for p in folder_names_and_paths.get(folder_name, ([], set()))[0]:
        full = os.path.join(p, filename)
        if os.path.isfile(full):
            return full
    return None
