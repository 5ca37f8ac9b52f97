"""The LoRAtorio custom nodes inside (a faithful fake of) ComfyUI: the repository loaded as ComfyUI
loads a custom node, whole samplings through API-format workflows, checked against the method
written out independently (tests/reference.py) on merged copies of the model."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fake_comfy
import reference
from fake_a1111.model import FakeSD
from test_a1111_extension import merged_copy, write_loras

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / "workflows"
D, TAU, LAM = 2, 1.0, 0.5  # patch 2 of the 8x8 latent: 16 patches, so the weights vary
NAMES = {
    "v1-5-pruned-emaonly.safetensors": "tiny.safetensors",
    "character.safetensors": "l0.safetensors",
    "background.safetensors": "l1.safetensors",
    "style.safetensors": "l2.safetensors",
}


def _install(tmp_path, **kwargs):
    write_loras(
        tmp_path / "loras",
        FakeSD(
            **{k: v for k, v in kwargs.items() if k in ("xl", "inpaint")},
            parameterization="v" if kwargs.get("prediction") == "v" else "eps",
        ),
    )
    return fake_comfy.install(tmp_path / "loras", **kwargs)


@pytest.fixture
def comfy(tmp_path):
    yield _install(tmp_path)
    fake_comfy.uninstall()


def workflow(name="loratorio_txt2img", **changes) -> dict:
    """An example workflow with the fake's file names, small sizes and the test's settings;
    changes: {node id: {input: value}} (None removes an input)."""
    prompt = json.loads((WORKFLOWS / f"{name}.json").read_text())
    for node in prompt.values():
        for key, value in list(node["inputs"].items()):
            if isinstance(value, str) and value in NAMES:
                node["inputs"][key] = NAMES[value]
            elif isinstance(value, str) and ", " in value:
                node["inputs"][key] = ", ".join(
                    NAMES.get(p.split(":")[0], p.split(":")[0]) + p[len(p.split(":")[0]) :]
                    for p in value.split(", ")
                )
        if node["class_type"] == "ApplyLoRAtorio":
            node["inputs"].update(patch_size=str(D), temperature=TAU, lam=LAM)
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=64, height=64)
        if node["class_type"] == "KSampler":
            node["inputs"].update(steps=4, cfg=6.0)
    for node_id, inputs in changes.items():
        for key, value in inputs.items():
            if value is None:
                prompt[node_id]["inputs"].pop(key, None)
            else:
                prompt[node_id]["inputs"][key] = value
    return prompt


def run(comfy, prompt) -> dict:
    comfy.nodes.SAVED.clear()
    comfy.nodes.execute(copy.deepcopy(prompt))
    return {prefix: torch.cat(images) for prefix, images in comfy.nodes.SAVED.items()}


def plain(comfy, **ksampler):
    """The workflow without LoRAtorio: the checkpoint's MODEL and CLIP straight to the sampler."""
    prompt = workflow()
    for node_id in ("2", "3", "4", "11", "12"):
        del prompt[node_id]
    prompt["5"]["inputs"]["clip"] = prompt["6"]["inputs"]["clip"] = ["1", 1]
    prompt["8"]["inputs"]["model"] = ["1", 0]
    prompt["8"]["inputs"].update(ksampler)
    return run(comfy, prompt)["loratorio"]


# --- the method written out ------------------------------------------------------------------------


def expected(
    comfy,
    loras=(("l0", 0.8, 0.8), ("l1", 1.0, 1.0)),
    *,
    prompt="a knight in a forest",
    negative="blurry",
    steps=4,
    cfg=6.0,
    seed=1,
    batch=1,
    lam=LAM,
    top_k=None,
    control=None,
    rule=reference.DEFAULT_RULE,
    reuse=False,
):
    """The sampling the nodes should give, from merged copies of the fake checkpoint: the fake's
    Euler on its "normal" schedule, every prediction eps from a copy with one LoRA merged (or none),
    the text encoded by a copy with every LoRA's text-encoder part merged (as LoraLoader applies it),
    each step the method in float64 (reference.py), then the fake VAE. control: the fake ControlNet
    whose residual joins every prediction of a row."""
    from comfy import samplers

    models, cond, uncond = _merged_models(comfy, loras, [prompt] * batch, [negative] * batch)
    base_model = comfy.model.model

    def eps(model, x, sigma, context):
        s = sigma * x.new_ones(x.shape[0])
        kwargs = {"control": control.get_control(x, s, None, 1, {})} if control is not None else {}
        return (x - model.apply_model(x, s, c_crossattn=context, **kwargs)) / sigma

    sigmas = samplers.calculate_sigmas(base_model.model_sampling, "normal", steps)
    torch.manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8) * sigmas[0]
    for i in range(steps):
        s = sigmas[i]
        preds_c = [eps(m, x, s, cond) for m in models]
        preds_u = [eps(m, x, s, uncond) for m in models] if cfg != 1 else [None] * len(models)
        keep = None
        if top_k is not None:
            keep = reference.top_k(reference.similarity(torch.stack(preds_c[1:]), preds_c[0], D), top_k)
        guided = reference.loratorio_step(
            preds_c[0],
            preds_u[0],
            torch.stack(preds_c[1:]),
            torch.stack(preds_u[1:]) if cfg != 1 else None,
            d=D,
            tau=TAU,
            lam=lam if cfg != 1 else 1.0,
            scale=cfg,
            keep=keep,
            rule=rule,
            reuse=reuse,
        ).float()
        x = x + guided * (sigmas[i + 1] - s)
    return comfy.nodes.FakeVAE().decode(x)


def _merged_models(comfy, loras, prompts, negatives):
    """BaseModels over copies of the fake's clean UNet with no LoRA and with each one merged, and
    the prompts encoded by a copy of its text encoder with every LoRA's text part merged."""
    from comfy.model_base import BaseModel

    comfy.management.unload_all_models()  # the shared encoder and UNet without any patcher's merges
    source, folder = comfy.source, Path(comfy.folder_paths.get_folder_paths("loras")[0])
    files = [(folder / f"{name}.safetensors", scale) for name, scale, _ in loras]
    text = merged_copy(
        source.cond_stage_model, [(folder / f"{n}.safetensors", c) for n, _, c in loras if c], "te1"
    )
    unet, prediction = comfy.model.model.diffusion_model, comfy.model.model.model_sampling.prediction
    unets = [merged_copy(unet, [], "unet")] + [merged_copy(unet, [lora], "unet") for lora in files]
    models = [BaseModel(u, source.alphas_cumprod, prediction) for u in unets]
    return models, text(prompts), text(negatives)


def _hooks(comfy) -> int:
    return sum(len(m._forward_hooks) for m in comfy.model.model.diffusion_model.modules())


def _close(actual, wanted):
    torch.testing.assert_close(actual, wanted, atol=2e-4, rtol=1e-4)


# --- install and nodes --------------------------------------------------------------------------------


def test_the_repository_loads_as_a_custom_node_with_its_four_nodes(comfy):
    assert comfy.loaded
    shown = {
        name: comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS[name]
        for name in ("LoRAtorioLoRAStack", "ApplyLoRAtorio", "LoRAtorioPool", "LoRAtorioWeightMaps")
    }
    assert shown == {
        "LoRAtorioLoRAStack": "LoRAtorio LoRA stack",
        "ApplyLoRAtorio": "Apply LoRAtorio",
        "LoRAtorioPool": "LoRAtorio pool",
        "LoRAtorioWeightMaps": "LoRAtorio weight maps",
    }
    for name in shown:
        cls = comfy.nodes.NODE_CLASS_MAPPINGS[name]
        assert cls.CATEGORY == "loratorio" and cls.DESCRIPTION
        inputs = {**cls.INPUT_TYPES()["required"], **cls.INPUT_TYPES().get("optional", {})}
        assert all(spec[1].get("tooltip") for spec in inputs.values()), name
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
    stack = comfy.nodes.NODE_CLASS_MAPPINGS["LoRAtorioLoRAStack"].INPUT_TYPES()["required"]["lora_name"][0]
    assert stack == ["l0.safetensors", "l1.safetensors", "l2.safetensors"]  # ComfyUI's loras folder


def test_install_py_installs_nothing_under_plain_python_as_comfyui_manager_runs_it(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "install.py")], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout == "" and done.stderr == ""


def test_install_py_uses_the_webuis_launch_module_when_there_is_one(tmp_path):
    (tmp_path / "launch.py").write_text(
        "calls = []\ndef is_installed(m):\n    print('asked', m)\n    return False\n"
        "def run_pip(args, desc):\n    print('pip', args)\n"
    )
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, str(ROOT / "install.py")], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.splitlines() == [
        "asked safetensors",
        'pip install "safetensors>=0.4"',
    ]


# --- the method ---------------------------------------------------------------------------------------


def test_the_example_workflow_composes_as_the_method_written_out(comfy):
    images = run(comfy, workflow())
    _close(images["loratorio"], expected(comfy))
    assert images["loratorio_maps"].shape == (2, 64, 64, 3)  # one map per LoRA
    assert not torch.equal(images["loratorio_maps"][0], images["loratorio_maps"][1])


@pytest.mark.parametrize("lam", [0.5, 1.0])
def test_batch_of_two_and_cfg_1_compose_as_the_method(comfy, lam):
    images = run(comfy, workflow(**{"7": {"batch_size": 2}, "4": {"lam": lam}}))
    _close(images["loratorio"], expected(comfy, batch=2, lam=lam))
    images = run(comfy, workflow(**{"8": {"cfg": 1.0}}))
    _close(images["loratorio"], expected(comfy, cfg=1.0))


def test_comfyuis_memory_split_gives_the_method_too(comfy):
    """Free memory for one chunk: calc_cond_batch then runs each chunk alone, the uncond first."""
    whole = run(comfy, workflow(**{"7": {"batch_size": 2}}))["loratorio"]
    comfy.management.FREE_MEMORY[0] = 1.5 * comfy.model.model.memory_required([2, 4, 8, 8])
    split = run(comfy, workflow(**{"7": {"batch_size": 2}}))["loratorio"]
    _close(split, whole)
    _close(split, expected(comfy, batch=2))


def test_a_pool_keeps_the_top_k_loras_as_the_method(comfy):
    images = run(comfy, workflow("loratorio_pool"))
    wanted = expected(comfy, loras=(("l0", 0.8, 0.8), ("l1", 1.0, 0.0), ("l2", 0.6, 0.0)), top_k=2)
    _close(images["loratorio_pool"], wanted)


def test_a_pool_keeps_the_stack_and_the_pool_loras_the_prompt_names_by_their_tags(comfy, tmp_path):
    from loratorio_core.lora import load_lora, save_lora

    for name, trigger in (("l1", "quix"), ("l2", "blen")):  # kohya's caption tags, as real LoRAs carry
        tags = {f"10_{trigger}": {trigger: 30, "knight": 30}}
        layers = load_lora(tmp_path / "loras" / f"{name}.safetensors").layers
        save_lora(
            tmp_path / "loras" / f"t_{trigger}.safetensors", layers, {"ss_tag_frequency": json.dumps(tags)}
        )
    prompt = workflow("loratorio_pool", **{"3": {"loras": "t_quix.safetensors, t_blen.safetensors:0.6"}})
    prompt["4"]["inputs"]["prompt"] = "a knight in a forest, blen"
    images = run(comfy, prompt)["loratorio_pool"]
    # the stack's l0 and the pool's blen are the top 2 at every step: the static pair's sampling
    _close(images, expected(comfy, loras=(("l0", 0.8, 0.8), ("t_blen", 0.6, 0.0))))


def test_controlnet_residuals_follow_their_rows(comfy):
    prompt = workflow()
    prompt["20"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "control.safetensors"}}
    prompt["21"] = {"class_type": "LoadImage", "inputs": {"image": "pose.png"}}
    prompt["22"] = {
        "class_type": "ControlNetApply",
        "inputs": {"conditioning": ["5", 0], "control_net": ["20", 0], "image": ["21", 0], "strength": 0.7},
    }
    prompt["8"]["inputs"]["positive"] = ["22", 0]
    images = run(comfy, prompt)
    hint = comfy.nodes.LoadImage().load_image("pose.png")[0]
    control = comfy.nodes.FakeControlNet(hint, 0.7)
    # the reference adds the residual to the uncond rows too; give the negative the same ControlNet
    prompt["23"] = {
        "class_type": "ControlNetApply",
        "inputs": {"conditioning": ["6", 0], "control_net": ["20", 0], "image": ["21", 0], "strength": 0.7},
    }
    prompt["8"]["inputs"]["negative"] = ["23", 0]
    both = run(comfy, prompt)["loratorio"]
    _close(both, expected(comfy, control=control))
    assert not torch.allclose(images["loratorio"], both)


# --- the model left as it was ---------------------------------------------------------------------------


def test_the_plain_workflow_after_a_composed_one_is_bit_identical(comfy):
    options = copy.deepcopy(comfy.model.model_options)
    before = plain(comfy)
    composed = run(comfy, workflow())["loratorio"]
    assert not torch.allclose(before, composed)
    assert torch.equal(plain(comfy), before)
    assert comfy.model.model_options == options and comfy.model.patches == {} and _hooks(comfy) == 0
    assert torch.equal(run(comfy, workflow())["loratorio"], composed)  # and composed repeats bit for bit


def test_an_interrupt_or_an_error_leaves_the_next_plain_prompt_identical(comfy, monkeypatch):
    before = plain(comfy)
    comfy.management.interrupt_current_processing(True)
    with pytest.raises(comfy.management.InterruptProcessingException):
        run(comfy, workflow())
    assert _hooks(comfy) == 0 and torch.equal(plain(comfy), before)

    from comfy.model_base import BaseModel

    calls = {"n": 0}
    original = BaseModel.apply_model

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("out of memory")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BaseModel, "apply_model", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        run(comfy, workflow())
    monkeypatch.setattr(BaseModel, "apply_model", original)
    assert _hooks(comfy) == 0 and torch.equal(plain(comfy), before)


def test_another_nodes_wrapper_in_the_slot_is_chained_not_replaced(comfy):
    seen = []

    def other(apply_model, args):
        seen.append(args["cond_or_uncond"])
        return apply_model(args["input"], args["timestep"], **args["c"])

    model = comfy.model.clone()
    model.set_model_unet_function_wrapper(other)
    comfy.nodes.CHECKPOINTS["tiny.safetensors"] = (model, comfy.clip, comfy.nodes.FakeVAE())
    images = run(comfy, workflow())
    assert seen and all(chunks for chunks in seen)
    _close(images["loratorio"], expected(comfy))


# --- modes, samplers, models ------------------------------------------------------------------------------


def test_mode_merge_through_our_runtime_equals_comfyuis_own_lora_loaders(comfy):
    merged = run(comfy, workflow(**{"4": {"mode": "merge"}}))
    maps = merged["loratorio_maps"]  # a baseline's maps: every LoRA everywhere (merge)
    assert maps.shape == (2, 64, 64, 3) and torch.equal(
        maps[0][..., 0] > 0, torch.ones(64, 64, dtype=torch.bool)
    )
    merged = merged["loratorio"]
    prompt = workflow()
    for node_id in ("11", "12"):
        del prompt[node_id]
    prompt["2"] = {
        "class_type": "LoraLoader",
        "inputs": {
            "model": ["1", 0],
            "clip": ["1", 1],
            "lora_name": "l0.safetensors",
            "strength_model": 0.8,
            "strength_clip": 0.8,
        },
    }
    prompt["3"] = {
        "class_type": "LoraLoader",
        "inputs": {
            "model": ["2", 0],
            "clip": ["2", 1],
            "lora_name": "l1.safetensors",
            "strength_model": 1.0,
            "strength_clip": 1.0,
        },
    }
    prompt["4"] = {
        "class_type": "LoraLoader",
        "inputs": {
            "model": ["3", 0],
            "clip": ["3", 1],
            "lora_name": "l1.safetensors",
            "strength_model": 0.0,
            "strength_clip": 0.0,
        },
    }
    own = run(comfy, prompt)["loratorio"]
    torch.testing.assert_close(merged, own, atol=1e-4, rtol=1e-4)
    composed = run(comfy, workflow())["loratorio"]
    assert not torch.allclose(composed, own, atol=1e-3)


@pytest.mark.parametrize("mode", ["composite", "switch"])
def test_the_baselines_run_and_differ_from_the_method(comfy, mode):
    composed = run(comfy, workflow())["loratorio"]
    baseline = run(comfy, workflow(**{"4": {"mode": mode}}))["loratorio"]
    assert torch.isfinite(baseline).all() and not torch.allclose(baseline, composed)


@pytest.mark.parametrize(
    "sampler,scheduler", [("euler_ancestral", "karras"), ("heun", "normal"), ("dpmpp_2m", "simple")]
)
def test_every_sampler_and_scheduler_composes_and_restores(comfy, sampler, scheduler):
    before = plain(comfy, sampler_name=sampler, scheduler=scheduler)
    composed = run(comfy, workflow(**{"8": {"sampler_name": sampler, "scheduler": scheduler}}))["loratorio"]
    assert torch.isfinite(composed).all() and not torch.allclose(composed, before)
    assert torch.equal(plain(comfy, sampler_name=sampler, scheduler=scheduler), before)


def test_heun_evaluates_twice_a_step_and_still_gives_a_step_per_pair(comfy):
    run(comfy, workflow(**{"8": {"sampler_name": "heun"}}))
    from loratorio_extension.comfyui import composition_of

    model = comfy.nodes.execute(workflow())["4"][0]
    steps = composition_of(model).rows.weights
    assert sorted(steps) == [0, 1, 2, 3]


def test_ksampler_advanced_and_sampler_custom_compose(comfy):
    prompt = workflow()
    prompt["8"] = {
        "class_type": "KSamplerAdvanced",
        "inputs": {
            "model": ["4", 0],
            "add_noise": "enable",
            "noise_seed": 1,
            "steps": 4,
            "cfg": 6.0,
            "sampler_name": "euler",
            "scheduler": "normal",
            "positive": ["5", 0],
            "negative": ["6", 0],
            "latent_image": ["7", 0],
            "start_at_step": 0,
            "end_at_step": 10000,
            "return_with_leftover_noise": "disable",
        },
    }
    _close(run(comfy, prompt)["loratorio"], expected(comfy))
    prompt["8"] = {
        "class_type": "SamplerCustom",
        "inputs": {
            "model": ["4", 0],
            "add_noise": True,
            "noise_seed": 1,
            "cfg": 6.0,
            "positive": ["5", 0],
            "negative": ["6", 0],
            "sampler": ["30", 0],
            "sigmas": ["31", 0],
            "latent_image": ["7", 0],
        },
    }
    prompt["30"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    prompt["31"] = {
        "class_type": "BasicScheduler",
        "inputs": {"model": ["4", 0], "scheduler": "normal", "steps": 4, "denoise": 1.0},
    }
    _close(run(comfy, prompt)["loratorio"], expected(comfy))


@pytest.mark.parametrize("kwargs", [{"prediction": "v"}, {"xl": True}, {"inpaint": True}])
def test_v_prediction_sdxl_and_inpainting_models_compose(tmp_path, kwargs):
    comfy = _install(tmp_path, **kwargs)
    try:
        before = plain(comfy)
        images = run(comfy, workflow())
        assert torch.isfinite(images["loratorio"]).all() and not torch.allclose(images["loratorio"], before)
        if not kwargs.get("xl") and not kwargs.get("inpaint"):
            _close(images["loratorio"], expected(comfy))
        assert torch.equal(plain(comfy), before)
    finally:
        fake_comfy.uninstall()


def test_img2img_and_inpainting_latents_compose(comfy):
    prompt = workflow(**{"8": {"denoise": 0.6}})
    prompt["20"] = {"class_type": "LoadImage", "inputs": {"image": "photo.png"}}
    prompt["21"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["20", 0], "vae": ["1", 2]}}
    prompt["8"]["inputs"]["latent_image"] = ["21", 0]
    img2img = run(comfy, prompt)["loratorio"]
    assert torch.isfinite(img2img).all()
    prompt["22"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}}
    prompt["23"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["21", 0], "mask": ["22", 0]}}
    prompt["8"]["inputs"].update(latent_image=["23", 0], denoise=1.0)
    inpainted = run(comfy, prompt)["loratorio"]
    photo = comfy.nodes.FakeVAE().decode(
        comfy.nodes.FakeVAE().encode(comfy.nodes.LoadImage().load_image("photo.png")[0])
    )
    torch.testing.assert_close(inpainted[:, :32], photo[:, :32])  # the unmasked upper half kept
    assert not torch.allclose(inpainted[:, 32:], photo[:, 32:])


@pytest.mark.parametrize("lam", [0.5, 1.0])
def test_area_and_mask_conditionings_compose(comfy, lam, monkeypatch):
    """ComfyUI gives the negative a copy of every positive area (same uuid): its rows are re-centred
    with the weights of the positive rows of that area, and both count as an image of their own."""
    from loratorio_extension.comfyui import Composition

    seen = []
    labels = Composition._labels
    monkeypatch.setattr(Composition, "_labels", lambda self, *a: seen.append(labels(self, *a)) or seen[-1])
    prompt = workflow(**{"4": {"lam": lam}})
    prompt["20"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a red banner", "clip": ["4", 1]}}
    prompt["21"] = {
        "class_type": "ConditioningSetArea",
        "inputs": {"conditioning": ["20", 0], "width": 32, "height": 32, "x": 16, "y": 0, "strength": 1.0},
    }
    prompt["22"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}}
    prompt["23"] = {
        "class_type": "ConditioningSetMask",
        "inputs": {"conditioning": ["20", 0], "mask": ["22", 0], "strength": 1.0, "set_cond_area": "default"},
    }
    prompt["24"] = {
        "class_type": "ConditioningCombine",
        "inputs": {"conditioning_1": ["5", 0], "conditioning_2": ["21", 0]},
    }
    prompt["25"] = {
        "class_type": "ConditioningCombine",
        "inputs": {"conditioning_1": ["24", 0], "conditioning_2": ["23", 0]},
    }
    prompt["8"]["inputs"]["positive"] = ["25", 0]
    images = run(comfy, prompt)
    assert torch.isfinite(images["loratorio"]).all()
    rows = [label for call in seen for label in call]
    assert not torch.allclose(images["loratorio"], run(comfy, workflow(**{"4": {"lam": lam}}))["loratorio"])
    assert {(r.branch, r.sample) for r in rows} == {("cond", 0), ("uncond", 0), ("cond", 1), ("uncond", 1)}
    # the whole-image positive and the mask one, one negative, every step
    assert sum(r.branch == "cond" and r.sample == 0 for r in rows) == 2 * sum(
        r.branch == "uncond" and r.sample == 0 for r in rows
    )


def test_an_area_only_positive_with_lam_below_1_fails_with_what_to_do(comfy):
    prompt = workflow()
    del prompt["11"], prompt["12"]  # an area-only image has no whole-image weights to map
    prompt["21"] = {
        "class_type": "ConditioningSetArea",
        "inputs": {"conditioning": ["5", 0], "width": 32, "height": 32, "x": 16, "y": 0, "strength": 1.0},
    }
    prompt["8"]["inputs"]["positive"] = ["21", 0]
    with pytest.raises(ValueError, match="set lam to 1"):
        run(comfy, prompt)
    assert _hooks(comfy) == 0
    prompt["4"]["inputs"]["lam"] = 1.0
    assert torch.isfinite(run(comfy, prompt)["loratorio"]).all()


# --- bad input ----------------------------------------------------------------------------------------


def test_the_weighting_rule_and_the_gated_pass_are_inputs_of_apply(comfy):
    paper = run(comfy, workflow(**{"4": {"weighting": "softmin"}}))["loratorio"]
    _close(paper, expected(comfy, rule="softmin"))  # the paper's rule, as written out
    assert not torch.allclose(paper, run(comfy, workflow())["loratorio"])  # the default, contrast
    gated = run(comfy, workflow(**{"4": {"exact_every": 2, "exact_first": 1}}))["loratorio"]
    assert torch.isfinite(gated).all() and not torch.allclose(gated, run(comfy, workflow())["loratorio"])
    with pytest.raises(ValueError, match="weighting='sharp' is not one of"):  # ComfyUI's own check of a list
        run(comfy, workflow(**{"4": {"weighting": "sharp"}}))


def test_the_negative_branch_can_reuse_the_positive_lora_change(comfy):
    reused = run(comfy, workflow(**{"4": {"uncond_loras": "reuse"}}))["loratorio"]
    _close(reused, expected(comfy, reuse=True))  # lam * base_u + (1 - lam) * (base_u + cond - base_c)
    assert not torch.allclose(reused, run(comfy, workflow())["loratorio"])
    assert _hooks(comfy) == 0 and comfy.model.patches == {}


def test_bad_settings_and_files_fail_with_a_message_naming_them(comfy, tmp_path):
    with pytest.raises(ValueError, match="patch size"):
        run(comfy, workflow(**{"4": {"patch_size": "big"}}))
    stack = comfy.nodes.NODE_CLASS_MAPPINGS["LoRAtorioLoRAStack"]()
    with pytest.raises(ValueError, match="no LoRA 'missing.safetensors' in ComfyUI's loras folders"):
        stack.add("missing.safetensors", 1.0, 1.0)  # (ComfyUI's own validation refuses it first)
    folder = Path(comfy.folder_paths.get_folder_paths("loras")[0])
    broken = folder / "broken.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(ValueError, match="broken.safetensors"):
        run(comfy, workflow(**{"2": {"lora_name": "broken.safetensors"}}))
    with pytest.raises(ValueError, match="no LoRAtorio composition"):
        run(comfy, workflow(**{"11": {"model": ["1", 0]}}))
    assert comfy.model.patches == {} and _hooks(comfy) == 0


@pytest.mark.parametrize("name", ["loratorio_txt2img", "loratorio_pool"])
def test_the_example_workflows_apply_the_shipped_defaults(name):
    from loratorio_core import LoRAtorioConfig
    from loratorio_core.config import format_patch

    defaults = LoRAtorioConfig()
    prompt = json.loads((WORKFLOWS / f"{name}.json").read_text())
    (apply,) = [node["inputs"] for node in prompt.values() if node["class_type"] == "ApplyLoRAtorio"]
    assert apply["temperature"] == defaults.temperature and apply["lam"] == defaults.recenter
    assert apply["patch_size"] == format_patch(defaults)
    assert apply.get("weighting", defaults.weighting) == defaults.weighting
