"""The extension inside (a faithful fake of) Forge: whole generations through the real entry script,
with Forge's UNet patcher, LoRA patches, model wrapper and processing flow, checked against the
method computed independently on merged copies."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import fake_forge
from fake_a1111.model import FakeSD
from test_a1111_extension import ON, PROMPT, expected_txt2img, write_loras

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"d": 2, "tau": 1.0, "lam": 0.5}


def _install(tmp_path, old=False, **model_kwargs):
    write_loras(tmp_path / "Lora", FakeSD(**model_kwargs))  # same seed and names as Forge's copy
    fake = fake_forge.install(tmp_path / "Lora", old=old, **model_kwargs)
    spec = importlib.util.spec_from_file_location("loratorio.py", ROOT / "scripts" / "loratorio.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fake.script_module, fake.script_class = module, module.LoRAtorioScript
    return fake


@pytest.fixture(params=["forge", "forge-old"])
def forge(request, tmp_path):
    """Each test runs on the "backend" Forge and on the ldm_patched one (f0, as reForge)."""
    fake = _install(tmp_path, old=request.param == "forge-old")
    fake.host = request.param
    yield fake
    fake_forge.uninstall()


def _backup(model) -> dict:
    """The original weights Forge keeps while LoRAs are merged (f2: its loader; f0: per load)."""
    loader = getattr(model, "lora_loader", None)
    return loader.backup if loader is not None else model.__dict__.get("_fake_weight_backup", {})


def generate(forge, prompt, args=None, *, txt2img=True, with_script=True, others=(), **kwargs):
    from modules import processing, scripts

    runner = scripts.ScriptRunner([*others, forge.script_class()] if with_script else list(others))
    script_args = list(args) if args is not None else runner.default_args()
    if others and args is not None:
        from extension.args import ARGS

        # our arguments in full (the API may send fewer), after the other scripts' inputs
        script_args += [arg.default for arg in ARGS[len(script_args) :]]
        script_args = [None] * (len(runner.inputs) - len(script_args)) + script_args
    cls = (
        processing.StableDiffusionProcessingTxt2Img
        if txt2img
        else processing.StableDiffusionProcessingImg2Img
    )
    defaults = dict(negative_prompt="blurry", steps=4, width=64, height=64, cfg_scale=6.0)
    p = cls(prompt=prompt, scripts=runner, script_args=script_args, **{**defaults, **kwargs})
    return processing.process_images(p), p


def _clean(root: torch.nn.Module, backup: dict) -> torch.nn.Module:
    """A copy of ``root`` with Forge's merged LoRAs taken back out (its loader's backups)."""
    out = copy.deepcopy(root)
    out.__dict__.pop("lora_loader", None)
    out.__dict__.pop("_fake_weight_backup", None)
    with torch.no_grad():
        for key, weight in backup.items():
            parent, name = key.rsplit(".", 1)
            setattr(out.get_submodule(parent), name, torch.nn.Parameter(weight.clone(), requires_grad=False))
    return out


def expected(forge, names=("l0", "l1"), **kwargs):
    """The method on the fake's schedule, from merged copies of Forge's clean UNet and text encoder."""
    sd = forge.sd
    kmodel = sd.forge_objects_original.unet.model
    clip = sd.forge_objects_original.clip.cond_stage_model
    view = SimpleNamespace(
        shared=forge.shared,
        sd=SimpleNamespace(
            model=SimpleNamespace(diffusion_model=_clean(kmodel, _backup(kmodel)).diffusion_model),
            cond_stage_model=_clean(clip, _backup(clip)),
            parameterization=sd.parameterization,
            alphas_cumprod=sd.alphas_cumprod,
        ),
    )
    return expected_txt2img(view, list(names), SETTINGS, **kwargs)


def split_by_memory(forge, batch_size=1):
    """Free memory for one chunk of Forge's CFG batch but not two: its memory check then runs the
    uncond chunk first and alone, as on an 8-12 GB card with SDXL."""
    one_chunk = forge.sd.forge_objects_original.unet.model.memory_required([batch_size, 4, 8, 8])
    forge.memory.free_memory = 1.5 * one_chunk


def _hooks(forge) -> int:
    unet = forge.sd.forge_objects_original.unet.model.diffusion_model
    return sum(len(m._forward_hooks) for m in unet.modules())


def test_forge_is_detected_and_its_host_drives_the_generation(forge):
    from loratorio_extension import script

    assert script.HOST == forge.host


def test_composes_the_prompts_loras_instead_of_letting_forge_merge_them(forge):
    result, _ = generate(forge, PROMPT, ON)
    torch.testing.assert_close(result.images[0], expected(forge)[0], atol=2e-4, rtol=1e-4)
    info = result.infotexts[0]
    assert "LoRAtorio: True" in info and "Lora hashes: l0: " in info


def test_per_lora_text_encoders_give_each_loras_rows_its_own_encoding(forge):
    text_encoder = forge.sd.forge_objects_original.clip.cond_stage_model
    shared, _ = generate(forge, PROMPT, ON)
    weights = {n: w.detach().clone() for n, w in text_encoder.named_parameters()}
    forge.shared.opts.data["loratorio_text_encoders"] = "per LoRA"
    result, p = generate(forge, PROMPT, ON)
    want = expected(forge, text_encoders="per LoRA")
    torch.testing.assert_close(result.images[0], want[0], atol=2e-4, rtol=1e-4)
    assert not torch.allclose(result.images[0], shared.images[0], atol=1e-3)
    # the host's CLIP is loaded again: its text encoder holds the shared LoRAs' weights, as before
    assert all(torch.equal(w, weights[n]) for n, w in text_encoder.named_parameters())
    assert not any(name in p.__dict__ for name in ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc"))
    hires, _ = generate(forge, PROMPT, ON, enable_hr=True)  # each pass encodes per LoRA again
    assert torch.isfinite(hires.images[0]).all()


@pytest.mark.parametrize(
    "case",
    [
        {"batch_size": 2},
        {"prompt": "a cat AND a hat <lora:l0:0.8> <lora:l1:1.0>"},
        {"one_chunk_per_call": True},
        {"xl": True},
    ],
    ids=["batch-2", "and-prompt", "separate-chunk-calls", "sdxl"],
)
def test_per_lora_text_rows_are_found_in_every_call_layout(tmp_path, capsys, case):
    """Every UNet call's text rows are matched to their prompt part: batches, AND parts (one chunk
    each), chunks split over calls, SDXL's crossattn + pooled vector; otherwise a warning says so."""
    case = dict(case)
    forge = _install(tmp_path, xl=case.pop("xl", False))
    try:
        if case.pop("one_chunk_per_call", False):
            split_by_memory(forge)
        prompt = case.pop("prompt", PROMPT)
        shared, _ = generate(forge, prompt, ON, **case)
        forge.shared.opts.data["loratorio_text_encoders"] = "per LoRA"
        result, _ = generate(forge, prompt, ON, **case)
        assert "match none" not in capsys.readouterr().err
        assert all(torch.isfinite(image).all() for image in result.images)
        assert not torch.allclose(result.images[0], shared.images[0], atol=1e-3)
    finally:
        fake_forge.uninstall()


def test_forge_never_merges_the_composed_loras_and_its_own_patches_stay(forge):
    kmodel = forge.sd.forge_objects_original.unet.model
    before = {n: p.detach().clone() for n, p in kmodel.diffusion_model.named_parameters()}
    generate(forge, PROMPT, ON)
    after = dict(kmodel.diffusion_model.named_parameters())
    assert all(torch.equal(after[n], w) for n, w in before.items())  # no double application
    # the LoRA-applied patcher all passes start from still has both LoRAs: only our clone lost them
    patcher = forge.sd.forge_objects_after_applying_lora.unet
    if forge.host == "forge":
        assert len(patcher.lora_patches) == 2
    else:
        assert all(len(entries) == 2 for entries in patcher.patches.values())
    assert _hooks(forge) == 0
    # and the next generation without LoRAtorio merges them as Forge always does
    plain, _ = generate(forge, PROMPT, with_script=False)
    assert not all(torch.equal(p, before[n]) for n, p in kmodel.diffusion_model.named_parameters())


def test_with_loratorio_off_nothing_changes_bit_for_bit(forge):
    off = [False, *ON[1:]]
    with_off, _ = generate(forge, PROMPT, off)
    without, _ = generate(forge, PROMPT, with_script=False)
    assert torch.equal(with_off.images[0], without.images[0])
    assert with_off.infotexts == without.infotexts


@pytest.mark.parametrize(
    "kwargs",
    [{"batch_size": 2}, {"batch_size": 2, "n_iter": 2}, {"sampler_name": "Heun"}, {"enable_hr": True}],
    ids=["batch-2", "batch-count-2", "second-order", "hires-fix"],
)
def test_every_generation_mode_runs_composed_and_restored(forge, kwargs):
    script = forge.script_class()
    passes = []
    original = script.process_before_every_sampling

    def spy(p, *args, **kw):
        original(p, *args, **kw)
        from loratorio_extension import session

        active = session.current()
        passes.append((p.is_hr_pass, active.rows is not None, len(active.adapters)))

    script.process_before_every_sampling = spy
    forge.script_class = lambda: script
    result, _ = generate(forge, PROMPT, ON, **kwargs)
    assert all(torch.isfinite(image).all() for image in result.images)
    assert len(result.images) == kwargs.get("batch_size", 1) * kwargs.get("n_iter", 1)
    assert _hooks(forge) == 0
    if kwargs.get("enable_hr"):
        # new Forge calls the hook 3 times: first pass, hires on the old objects (ignored), hires
        hires = [(True, True, 2)] * (2 if forge.host == "forge" else 1)
        assert passes == [(False, True, 2), *hires]
    if kwargs == {"batch_size": 2}:
        torch.testing.assert_close(result.images[0], expected(forge)[0], atol=2e-4, rtol=1e-4)
    if kwargs == {"sampler_name": "Heun"}:
        plain, _ = generate(forge, PROMPT, with_script=False, sampler_name="Heun")
        assert not torch.equal(plain.images[0], result.images[0])


@pytest.mark.parametrize("model", [{"parameterization": "v"}, {"xl": True}], ids=["v-prediction", "sdxl"])
def test_v_prediction_and_sdxl_models_compose_on_eps(tmp_path, model):
    forge = _install(tmp_path, **model)
    try:
        result, _ = generate(forge, PROMPT, ON)
        if model.get("xl"):  # dict conditioning (crossattn + vector) reaches every row
            plain, _ = generate(forge, PROMPT, with_script=False)
            assert torch.isfinite(result.images[0]).all() and not torch.equal(
                plain.images[0], result.images[0]
            )
        else:
            torch.testing.assert_close(result.images[0], expected(forge)[0], atol=3e-4, rtol=1e-4)
    finally:
        fake_forge.uninstall()


def test_inpainting_and_img2img_compose_with_the_image_conditioning_following_the_rows(tmp_path):
    forge = _install(tmp_path, inpaint=True)
    try:
        mask = torch.zeros(1, 1, 8, 8)
        mask[..., 4:] = 1
        init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        kwargs = dict(txt2img=False, init_latent=init, mask=mask)
        plain, _ = generate(forge, PROMPT, with_script=False, **kwargs)
        composed, _ = generate(forge, PROMPT, ON, **kwargs)
        assert torch.isfinite(composed.images[0]).all() and not torch.equal(
            plain.images[0], composed.images[0]
        )
        assert _hooks(forge) == 0
    finally:
        fake_forge.uninstall()


def test_and_prompts_compose_every_sub_prompt(forge):
    result, _ = generate(forge, "a cat AND a hat <lora:l0:0.8> <lora:l1:1.0>", ON)
    plain, _ = generate(forge, "a cat AND a hat <lora:l0:0.8> <lora:l1:1.0>", with_script=False)
    assert torch.isfinite(result.images[0]).all() and not torch.equal(result.images[0], plain.images[0])


def test_cond_and_uncond_in_separate_calls_give_the_same_image_when_the_uncond_is_the_bases(forge):
    """Forge splits the chunks when memory is short (uncond first, alone): with lam = 1 the uncond
    branch is the base model's, which needs nothing from the cond rows."""
    lam1 = [True, "LoRAtorio", 2, 1.0, 1.0, "", 0, 1, False]
    together, _ = generate(forge, PROMPT, lam1)
    split_by_memory(forge)
    apart, _ = generate(forge, PROMPT, lam1)
    torch.testing.assert_close(apart.images[0], together.images[0], atol=3e-4, rtol=1e-3)


@pytest.mark.parametrize("split", [False, True], ids=["one-call", "uncond-first-alone"])
def test_a_pool_with_top_k_at_lam_half_is_the_method_however_forge_splits_its_batch(forge, split):
    """Short of memory, Forge runs the uncond chunk first and alone (then the cond chunk): the
    uncond branch is still re-centred with the COND rows' weights over the kept LoRAs."""
    if split:
        split_by_memory(forge)
    pool = [True, "LoRAtorio", 2, 1.0, 0.5, "l0, l1, l2", 2, 1, False]
    result, _ = generate(forge, "a cat", pool)
    names = ("l0", "l1", "l2")
    want = expected(forge, names, scales=dict.fromkeys(names, 1.0), text_loras=(), top_k=2)
    torch.testing.assert_close(result.images[0], want[0], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_size": 2},
        {"sampler_name": "Heun"},
        {"prompt": "a cat AND a hat <lora:l0:0.8> <lora:l1:1.0>"},
        {"enable_hr": True},
    ],
    ids=["batch-2", "second-order", "and-prompt", "hires-fix"],
)
def test_forges_memory_split_gives_the_image_of_one_call(forge, kwargs):
    """Each evaluation's cond rows are composed before its uncond rows and once only: batches,
    the second evaluation of a Heun step, AND parts split over calls, the hires pass."""
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt", PROMPT)
    together, _ = generate(forge, prompt, ON, **kwargs)
    calls = []
    forge.sd.forge_objects_after_applying_lora.unet.set_model_unet_function_wrapper(
        lambda apply_model, args: (
            calls.append(args["cond_or_uncond"]) or apply_model(args["input"], args["timestep"], **args["c"])
        )
    )
    split_by_memory(forge, kwargs.get("batch_size", 1))
    apart, _ = generate(forge, prompt, ON, **kwargs)
    assert calls[0] == [1]  # Forge's first call of a step: the uncond chunk alone
    assert all(len(chunks) == 1 for chunks in calls)
    for got, want in zip(apart.images, together.images, strict=True):
        torch.testing.assert_close(got, want, atol=3e-4, rtol=1e-3)


def other_wrapper_script(tile: bool):
    """Another extension that puts its own model_function_wrapper in the slot before ours runs;
    with ``tile``, MultiDiffusion-like: "tiles" (here the whole latent twice) batched into one call."""
    from modules import scripts

    class OtherWrapper(scripts.Script):
        calls = 0

        def title(self):
            return "Other"

        def show(self, is_img2img):
            return scripts.AlwaysVisible

        def ui(self, is_img2img):
            return []

        def process_before_every_sampling(self, p, *args, **kwargs):
            unet = p.sd_model.forge_objects.unet.clone()
            script = self

            def wrapper(model_function, args):
                script.calls += 1
                x, t, c = args["input"], args["timestep"], args["c"]
                if not tile:
                    return model_function(x, t, **c)
                doubled = {k: (torch.cat([v, v]) if torch.is_tensor(v) else v) for k, v in c.items()}
                out = model_function(torch.cat([x, x]), torch.cat([t, t]), **doubled)
                return (out[: x.shape[0]] + out[x.shape[0] :]) / 2

            unet.set_model_unet_function_wrapper(wrapper)
            p.sd_model.forge_objects.unet = unet

    return OtherWrapper()


@pytest.mark.parametrize("tile", [False, True], ids=["pass-through", "tile-batching"])
def test_a_wrapper_already_in_the_slot_still_runs_around_ours(forge, tile):
    alone, _ = generate(forge, PROMPT, ON)
    other = other_wrapper_script(tile)
    chained, _ = generate(forge, PROMPT, ON, others=[other])
    assert other.calls == 4 and not forge.errors.reported
    torch.testing.assert_close(chained.images[0], alone.images[0], atol=3e-4, rtol=1e-3)


def test_forge_is_told_the_larger_batch_and_the_lora_tensors(forge):
    generate(forge, PROMPT, with_script=False)
    plain = dict(forge.memory.last_load)
    generate(forge, PROMPT, ON)
    composed = dict(forge.memory.last_load)
    # 2 LoRAs, lam < 1: 2N + 2 = 6 rows per image instead of CFG's 2
    assert composed["memory_required"] == 3 * plain["memory_required"]
    assert composed["hard_memory_preservation"] > plain["hard_memory_preservation"]


def test_an_exception_inside_a_pass_leaves_the_model_as_it_was(forge):
    unet = forge.sd.forge_objects_original.unet.model.diffusion_model
    baseline, _ = generate(forge, PROMPT, with_script=False)

    def boom(module, args, output):
        raise RuntimeError("a failing layer")

    handle = unet.out[2].register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="a failing layer"):
        generate(forge, PROMPT, ON)
    handle.remove()
    assert _hooks(forge) == 0
    after, _ = generate(forge, PROMPT, with_script=False)
    assert torch.equal(after.images[0], baseline.images[0])


def test_interrupt_mid_generation_ends_cleanly(forge):
    from modules import script_callbacks, shared

    def interrupt_at_second_step(params):
        if params.denoiser.step == 1:
            shared.state.interrupted = True

    script_callbacks.on_cfg_denoiser(interrupt_at_second_step)
    result, _ = generate(forge, PROMPT, ON)
    shared.state.interrupted = False
    assert len(result.images) == 1 and torch.isfinite(result.images[0]).all()
    assert _hooks(forge) == 0


def test_bad_api_arguments_fail_the_generation_with_a_clear_message(forge):
    with pytest.raises(ValueError, match=r"LoRAtorio argument 1 \(mode\)"):
        generate(forge, PROMPT, [True, "Blend"])
    ok, _ = generate(forge, PROMPT, with_script=False)
    assert torch.isfinite(ok.images[0]).all()


def test_a_pool_without_prompt_tags_is_composed_keeping_the_top_k(forge):
    pool = [True, "LoRAtorio", 2, 1.0, 0.5, "l0, l1, l2", 2, 1, False]
    result, _ = generate(forge, "a cat", pool)
    assert "LoRAtorio kept: " in result.infotexts[0]
    kept = result.infotexts[0].split("LoRAtorio kept: ")[1].split(",")[:2]
    assert len(kept) == 2 and _hooks(forge) == 0


@pytest.mark.parametrize(
    "name",
    [
        "test_xyz_axes_set_the_cells_settings",
        "test_infotext_fields_paste_the_settings_back",
        "test_api_alwayson_args_take_defaults_for_what_is_missing",
        "test_show_weight_maps_adds_one_overlay_per_lora_and_image",
        "test_rows_per_forward_setting_gives_the_same_image",
        "test_auto_compose_turns_loratorio_on_for_two_or_more_prompt_loras",
        "test_settings_section_is_registered",
    ],
)
def test_the_webui_conventions_hold_on_forge_as_on_a1111(forge, name):
    """X/Y/Z axes, infotext paste-back, API defaults, weight maps, settings: the A1111 tests, run on Forge
    (the "backend" one: these go through the script, which the two Forges share, not the patchers)."""
    import test_a1111_extension

    if forge.host == "forge-old":
        pytest.skip("host-independent script code: checked on the new Forge")

    getattr(test_a1111_extension, name)(forge)


def test_when_nothing_is_composed_no_settings_are_recorded_and_the_user_is_told(forge, capsys):
    prompt = "a cat <lora:ghost:1.0>"  # a LoRA Forge cannot load: nothing to compose
    result, _ = generate(forge, prompt, ON)
    plain, _ = generate(forge, prompt, with_script=False)
    assert torch.equal(result.images[0], plain.images[0])
    assert "LoRAtorio" not in result.infotexts[0] and result.infotexts == plain.infotexts
    said = [line for line in capsys.readouterr().err.splitlines() if "nothing composed" in line]
    assert len(said) == 1 and result.comments.startswith("LoRAtorio: nothing composed")


def test_the_tab_builds_with_each_forges_gradio(forge):
    """Forge f2 runs gradio 4.40, which takes typed "name:scale" entries in the tab's multiselect;
    the ldm_patched Forge runs gradio 3.41.2, which refuses them: there the scales get a textbox."""
    import gradio
    from loratorio_extension import tab
    from modules import script_callbacks

    tabs = script_callbacks.ui_tabs_callback()
    assert not forge.errors.reported
    assert [(title, elem_id) for _, title, elem_id in tabs] == [("LoRAtorio", "loratorio_tab")]
    assert tab.typed_values_in_multiselect(gradio) == (forge.host == "forge")


def test_each_image_of_a_batch_records_the_loras_it_kept(forge):
    """Forge f2's create_infotext (WebUI 1.10) picks a list value per image; old Forge's (1.8)
    writes a list whole, so there each image's own value is set just before its infotext is made."""
    pool = [True, "LoRAtorio", 2, 1.0, 0.5, "l0, l1, l2", 2, 1, False]
    result, _ = generate(forge, "a cat", pool, batch_size=2, steps=2)
    values = [info.split("LoRAtorio kept: ")[1].split("\n")[0] for info in result.infotexts]
    assert len(values) == 2
    for value in values:  # two names of the pool, not a list of every image's
        assert "[" not in value and len(value.split(", ")) == 2 and set(value.split(", ")) <= {"l0", "l1", "l2"}


@pytest.mark.parametrize("split", [False, True], ids=["one-call", "memory-split"])
def test_the_gated_single_pass_evaluates_two_rows_between_exact_steps_however_forge_splits_its_batch(forge, split):
    """exact_every 2, exact_first 1 over 6 steps: exact steps 0, 2, 4 evaluate base + both LoRAs
    in cond and uncond (6 rows) and the 2 gated rows whose residual the next step adds; gated
    steps 1, 3, 5 only those 2 rows, as merging costs. The memory split gives the same image."""
    gated = ON + [2, 1]
    together, _ = generate(forge, PROMPT, gated, steps=6)
    rows: list[int] = []
    unet = forge.sd.forge_objects_original.unet.model.diffusion_model
    handle = unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        if split:
            split_by_memory(forge)
        result, _ = generate(forge, PROMPT, gated, steps=6)
    finally:
        handle.remove()
    assert sum(rows) == 3 * (6 + 2) + 3 * 2
    torch.testing.assert_close(result.images[0], together.images[0], atol=3e-4, rtol=1e-3)
    exact, _ = generate(forge, PROMPT, ON, steps=6)
    assert not torch.allclose(together.images[0], exact.images[0], atol=1e-3)
    assert "LoRAtorio exact every: 2" in together.infotexts[0]
