"""A node can reach nothing outside its registered model folders, and refuses choices that are not its options.

Names are judged from their text alone (no '..', absolute paths, drives, NUL), so a refusal says nothing
about the rest of the disk; a symlink a user put inside a model folder and extra_model_paths.yaml folders
keep working. Choice inputs are checked by the nodes (ComfyUI v0.3.75 does not check V3 combo values).
"""

import inspect
import os
import shutil

import pytest

from conftest import fixture_path, load_json
from test_nodes import _run, _tiny_models_folder

BAD_NAMES = {  # name -> the reason the message gives
    "../outside.safetensors": "'..' component",
    "sub/../../outside.safetensors": "'..' component",
    "..\\..\\outside.safetensors": "'..' component",
    "sub\\..\\..\\outside.safetensors": "'..' component",
    "/etc/passwd": "absolute path",
    "\\\\server\\share\\x.pt": "absolute path",
    "\\windows\\x.pt": "absolute path",
    "C:\\models\\x.pt": "drive letter",
    "C:x.pt": "drive letter",
    "tiny.safetensors\x00.txt": "NUL byte",
    "...\\x.pt": "only of dots or spaces",
    ".. /x.pt": "only of dots or spaces",
    "": "empty",
    "   ": "empty",
    ".": "the folder itself",
    "./": "the folder itself",
}
GOOD_NAMES = ["tiny.safetensors", "sub/tiny.safetensors", "sub\\tiny.safetensors", "./tiny.safetensors",
              "a..b.pt", "..hidden.pt", "sub/.x/tiny.pt"]


def tiny_ddpm_overrides() -> str:
    kw = load_json("guided_diffusion", "tiny_unet_config.json")["create_model_kwargs"]
    return f"num_head_channels={kw['num_head_channels']}, image_size={kw['image_size']}"


@pytest.mark.parametrize("name", list(BAD_NAMES), ids=repr)
def test_name_rules_refuse(pack, name):
    from diffuseit_pack.nodes.comfy_bridge import model_name_problem
    assert BAD_NAMES[name] in model_name_problem(name)


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_name_rules_accept(pack, name):
    from diffuseit_pack.nodes.comfy_bridge import model_name_problem
    assert model_name_problem(name) is None


def _outside_checkpoint(tmp_path):
    """A loadable tiny checkpoint outside every model folder, its absolute path and its path from the folder."""
    outside = tmp_path / "elsewhere" / "outside.safetensors"
    outside.parent.mkdir(parents=True)
    shutil.copy(fixture_path("guided_diffusion", "tiny_unet.safetensors"), outside)
    return outside


def _refusal(node, **kwargs) -> str:
    from diffuseit_pack.nodes.comfy_bridge import ModelNameError
    with pytest.raises(ModelNameError) as err:
        _run(node, **kwargs)
    return str(err.value)


def test_ddpm_names_outside_the_folders_are_refused_and_reveal_nothing(pack, tmp_path):
    """An outside file that exists and one that does not get the same message: nothing is looked up."""
    _, models = pack
    from diffuseit_pack.nodes.loaders import LoadDDPM
    folder = models / "guided_diffusion"
    folder.mkdir(exist_ok=True)
    outside = _outside_checkpoint(tmp_path)
    missing = outside.with_name("missing.safetensors")
    up = os.path.relpath(outside, folder)
    assert up.startswith("..") and os.path.isfile(folder / up)  # without the check this name would load
    for existing, absent in [(up, os.path.relpath(missing, folder)), (str(outside), str(missing)),
                             (up.replace("/", "\\"), os.path.relpath(missing, folder).replace("/", "\\")),
                             ("tiny.safetensors\x00" + up, "tiny.safetensors\x00" + os.path.relpath(missing, folder))]:
        messages = []
        for name in (existing, absent):
            msg = _refusal(LoadDDPM, ckpt_name=name, dtype="fp32", overrides=tiny_ddpm_overrides())
            assert LoadDDPM.validate_inputs(ckpt_name=name, dtype="fp32") == msg  # POST /prompt refuses it too
            assert msg.startswith(f"LoadDDPM ckpt_name: {name!r} is not a file name inside the guided_diffusion "
                                  "model folders (")
            assert msg.endswith("); choose one of the listed files")
            rest = msg.replace(repr(name), "")
            assert "/" not in rest and str(models) not in rest  # no path but the one the user typed
            assert "exist" not in msg.lower() and "not found" not in msg.lower()
            messages.append(rest)
        assert messages[0] == messages[1]


def test_every_loader_refuses_a_path_outside(pack, tmp_path):
    _, models = pack
    _tiny_models_folder(models)
    from diffuseit_pack.nodes.loaders import LoadCLIPGuidance, LoadDINO, LoadLPIPS
    outside = str(tmp_path / "x.pth")
    assert "LoadDINO dino_name: " in _refusal(LoadDINO, dino_name=outside, antialias=False)
    assert "LoadLPIPS vgg_name: " in _refusal(LoadLPIPS, vgg_name="../lpips/" + "x.pth")
    msg = _refusal(LoadCLIPGuidance, models=f"tiny-clip, ../{os.path.basename(str(tmp_path))}", dtype="fp32")
    assert msg.startswith("LoadCLIPGuidance models: '../") and "clip_guidance model folders" in msg
    for node, kwargs in [(LoadDINO, {"dino_name": outside}), (LoadLPIPS, {"vgg_name": outside}),
                         (LoadCLIPGuidance, {"models": f"ViT-B-16,{outside}", "dtype": "auto"})]:
        result = node.validate_inputs(**kwargs)
        assert isinstance(result, str) and "absolute path" in result, node


def test_clip_folder_outside_is_refused_even_when_it_is_a_real_model(pack, tmp_path, monkeypatch):
    """A real custom open_clip folder outside the models folder: by absolute path, by '..', and by a name
    relative to the server's working directory (which is not a model folder) -- none loads."""
    _, models = pack
    _tiny_models_folder(models)
    from diffuseit_pack.core.encoders.clip import ClipLoadError
    from diffuseit_pack.nodes.loaders import LoadCLIPGuidance
    outside = tmp_path / "evil-clip"
    shutil.copytree(models / "clip_guidance" / "tiny-clip", outside)
    assert "absolute path" in _refusal(LoadCLIPGuidance, models=str(outside), dtype="fp32")
    assert "'..'" in _refusal(LoadCLIPGuidance, models=os.path.relpath(outside, models / "clip_guidance"), dtype="fp32")
    monkeypatch.chdir(tmp_path)  # 'evil-clip' is now a folder relative to the working directory
    with pytest.raises(ClipLoadError, match="unknown CLIP architecture 'evil-clip'"):
        _run(LoadCLIPGuidance, models="evil-clip", dtype="fp32")


def test_symlinks_inside_a_model_folder_still_load(pack, tmp_path):
    """People link models from other disks: a linked file and a linked sub-folder load, as in ComfyUI."""
    _, models = pack
    from diffuseit_pack.nodes.loaders import LoadDDPM
    folder = models / "guided_diffusion"
    folder.mkdir(exist_ok=True)
    outside = _outside_checkpoint(tmp_path)
    (folder / "linked.safetensors").symlink_to(outside)
    (folder / "other_disk").symlink_to(outside.parent, target_is_directory=True)
    try:
        for name in ("linked.safetensors", "other_disk/outside.safetensors"):
            (ddpm,) = _run(LoadDDPM, ckpt_name=name, dtype="fp32", overrides=tiny_ddpm_overrides())
            assert ddpm.value.image_size == load_json("guided_diffusion", "tiny_unet_config.json")[
                "create_model_kwargs"]["image_size"]
    finally:
        (folder / "linked.safetensors").unlink()
        (folder / "other_disk").unlink()


def test_a_file_in_an_extra_model_path_loads(pack, tmp_path):
    """extra_model_paths.yaml adds folders to folder_paths: a file only there loads; '..' out of it does not."""
    _, models = pack
    import folder_paths
    from diffuseit_pack.nodes.comfy_bridge import ModelNameError
    from diffuseit_pack.nodes.loaders import LoadDDPM
    extra = tmp_path / "extra" / "guided_diffusion"
    extra.mkdir(parents=True)
    shutil.copy(fixture_path("guided_diffusion", "tiny_unet.safetensors"), extra / "only_in_extra.safetensors")
    assert not (models / "guided_diffusion" / "only_in_extra.safetensors").exists()
    folder_paths.add_model_folder_path("guided_diffusion", str(extra))
    try:
        (ddpm,) = _run(LoadDDPM, ckpt_name="only_in_extra.safetensors", dtype="fp32", overrides=tiny_ddpm_overrides())
        assert ddpm.value.unet is not None
        with pytest.raises(ModelNameError):
            _run(LoadDDPM, ckpt_name="../guided_diffusion/only_in_extra.safetensors", dtype="fp32", overrides="")
    finally:
        folder_paths.folder_names_and_paths["guided_diffusion"][0].remove(str(extra))


def test_a_legal_missing_name_keeps_the_download_message(pack):
    from diffuseit_pack.core.diffusion.checkpoints import MissingWeightsError
    from diffuseit_pack.nodes.loaders import LoadDDPM
    with pytest.raises(MissingWeightsError) as err:
        _run(LoadDDPM, ckpt_name="sub/256x256_diffusion_uncond.pt", dtype="fp32", overrides="")
    assert "https://" in str(err.value) and "guided_diffusion" in str(err.value)


# ------------------------------------------------------------------------------------------ choices


def _combos(node):
    return [i for i in node.define_schema().inputs if i.io_type == "COMBO"]


FOLDER_COMBOS = {"ckpt_name", "dino_name", "vgg_name", "decoder"}  # file names: checked against the folders, not the list


def test_every_combo_input_is_validated_by_its_node(pack):
    """Every COMBO input is an argument of the node's validate_inputs, which takes no **kwargs (that would make
    ComfyUI skip its own min/max checks of every input); a value outside the options is refused there and at
    the start of execute, before any other input is looked at."""
    from diffuseit_pack.nodes.checks import InputError
    from diffuseit_pack.nodes import NODES as nodes
    checked = 0
    for node in nodes:
        combos = _combos(node)
        if not combos:
            continue
        spec = inspect.getfullargspec(node.validate_inputs)
        assert spec.varkw is None, node
        for combo in combos:
            node_id = node.define_schema().node_id
            assert combo.id in spec.args, f"{node_id}.{combo.id} is not checked by validate_inputs"
            assert node.validate_inputs(**{combo.id: None}) is True  # linked from another node: known only at run time
            if combo.id in FOLDER_COMBOS:
                assert "absolute path" in node.validate_inputs(**{combo.id: "/etc/passwd"})
                continue
            for option in combo.options:
                assert node.validate_inputs(**{combo.id: option}) is True
            expected = f"{node_id} {combo.id}: 'bogus' is not one of {', '.join(combo.options)}"
            assert node.validate_inputs(**{combo.id: "bogus"}) == expected
            required = [name for name, p in inspect.signature(node.execute).parameters.items()
                        if p.default is inspect.Parameter.empty]
            with pytest.raises(InputError) as err:  # the other inputs are None: nothing else is looked at first
                node.execute(**{**dict.fromkeys(required), combo.id: "bogus"})
            assert str(err.value) == expected
            checked += 1
    assert checked >= 6  # dtype x2, contrast_schedule, mode, sampler, criteria


def test_fp64_dtype_is_a_clear_error(pack):
    from diffuseit_pack.nodes.checks import InputError
    from diffuseit_pack.nodes.loaders import LoadCLIPGuidance, LoadDDPM
    with pytest.raises(InputError, match=r"^LoadDDPM dtype: 'fp64' is not one of auto, fp32, fp16, bf16$"):
        _run(LoadDDPM, ckpt_name="tiny.safetensors", dtype="fp64", overrides="")
    with pytest.raises(InputError, match=r"^LoadCLIPGuidance dtype: 'fp64' is not one of auto, fp32, fp16$"):
        _run(LoadCLIPGuidance, models="tiny-clip", dtype="fp64")
