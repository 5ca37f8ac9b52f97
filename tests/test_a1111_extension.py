"""The extension inside (a faithful fake of) AUTOMATIC1111 1.10.1: whole generations through the real
entry script, checked against the method computed independently on merged copies."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from loratorio_core.lora import LayerUpdate, save_lora

import fake_a1111
import reference as ref
from fake_a1111.model import FakeSD

ROOT = Path(__file__).resolve().parent.parent
SCALES = {"l0": 0.8, "l1": 1.0, "l2": 0.6}


def write_loras(folder: Path, sd: FakeSD):
    """Kohya files in the LDM naming A1111's built-in maps onto its modules: UNet attention and conv
    layers, and the text encoder."""
    folder.mkdir(exist_ok=True)
    for i, name in enumerate(SCALES):
        g = torch.Generator().manual_seed(i)
        layers = {}
        for component, model, keep in (
            (
                "unet",
                sd.model.diffusion_model,
                lambda n: "transformer_blocks" in n or "in_layers.2" in n,
            ),
            ("te1", sd.cond_stage_model.transformer, lambda n: "mlp" in n),
        ):
            for module_name, module in model.named_modules():
                if not isinstance(module, (nn.Linear, nn.Conv2d)) or not keep(module_name):
                    continue
                w = module.weight
                kernel = tuple(w.shape[2:])
                down = torch.randn(4, w.shape[1], *kernel, generator=g) * 0.5 / (w.shape[1] ** 0.5)
                up = torch.randn(w.shape[0], 4, *(1,) * len(kernel), generator=g) * 0.5
                layers[(component, module_name.replace(".", "_"))] = LayerUpdate(down=down, up=up, alpha=2.0)
        save_lora(folder / f"{name}.safetensors", layers)


@pytest.fixture
def webui(tmp_path):
    sd = FakeSD()
    write_loras(tmp_path / "Lora", sd)
    fake = fake_a1111.install(sd, tmp_path / "Lora")
    spec = importlib.util.spec_from_file_location("loratorio.py", ROOT / "scripts" / "loratorio.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fake.script_class = module.LoRAtorioScript
    fake.sd = sd
    yield fake
    fake_a1111.uninstall()


def generate(webui, prompt, args=None, *, txt2img=True, with_script=True, **kwargs):
    from modules import processing, scripts

    runner = scripts.ScriptRunner([webui.script_class()] if with_script else [])
    script_args = list(args) if args is not None else runner.default_args()
    cls = (
        processing.StableDiffusionProcessingTxt2Img
        if txt2img
        else processing.StableDiffusionProcessingImg2Img
    )
    p = cls(prompt=prompt, scripts=runner, script_args=script_args, **{**JOB, **kwargs})
    return processing.process_images(p), p


JOB = dict(negative_prompt="blurry", steps=4, width=64, height=64, cfg_scale=6.0)  # every test's job


ON = [True, "LoRAtorio", 2, 1.0, 0.5, "", 0, 1, False]
PROMPT = "a cat <lora:l0:0.8> <lora:l1:1.0>"


def txt2img(runner, script_args, prompt=PROMPT, **kwargs):
    """A txt2img job of the tests' size for ``runner``, not yet processed."""
    from modules import processing

    return processing.StableDiffusionProcessingTxt2Img(
        prompt=prompt, scripts=runner, script_args=script_args, **{**JOB, **kwargs}
    )


def merged_copy(module: nn.Module, loras, component):
    """A copy of ``module`` with the LoRA files' deltas merged in, free of the built-in's names."""
    import safetensors.torch

    out = copy.deepcopy(module)
    for m in out.modules():
        backup = m.__dict__.get("network_weights_backup")
        if backup is not None:  # the built-in merged a LoRA in place: start from the original weight
            with torch.no_grad():
                m.weight.copy_(backup)
        for attr in ("network_layer_name", "network_weights_backup", "network_current_names"):
            m.__dict__.pop(attr, None)
    modules = {n.replace(".", "_"): m for n, m in out.named_modules()}
    prefix = {"unet": "lora_unet_", "te1": "lora_te1_"}[component]
    with torch.no_grad():
        for path, scale in loras:
            state = safetensors.torch.load_file(str(path))
            for key in {k.split(".")[0] for k in state}:
                if not key.startswith(prefix):
                    continue
                target = modules[("transformer_" if component == "te1" else "") + key[len(prefix) :]]
                update = LayerUpdate(
                    down=state[f"{key}.lora_down.weight"],
                    up=state[f"{key}.lora_up.weight"],
                    alpha=float(state[f"{key}.alpha"]),
                )
                target.weight += scale * update.delta_weight(target.weight.shape)
    return out


def expected_txt2img(
    webui,
    names,
    settings,
    prompt="a cat",
    negative="blurry",
    steps=4,
    cfg=6.0,
    seed=1,
    batch=1,
    text_encoders="shared",
    scales=None,
    text_loras=None,
    top_k=None,
    pad=None,
    skip_uncond=(),
):
    """The method written out on the fake's own Euler schedule, every prediction from a merged copy.
    text_encoders "per LoRA": each LoRA's rows see the prompt encoded with its own text-encoder part,
    the base rows the plain encoding. scales: each LoRA's scale (default: its prompt tag's);
    text_loras: the LoRAs whose text-encoder parts the host applies (default: all; a pool's LoRAs
    are not in the prompt, so none); top_k: keep the k most divergent LoRAs, chosen every step.
    AND in the prompt: each sub-prompt composed with its own weights, the uncond with their mean.
    pad: "pad" / "v0", the host's padding of prompt and negative prompt to one length (A1111's
    pad_cond_uncond / _v0) applied to every encoding; skip_uncond: the steps without the uncond
    branch (e_c alone, A1111's skip_early_cond / negative guidance minimum sigma)."""
    import modules

    # the A1111 fake's k-diffusion schedule (under the Forge fake too: its ``a1111_version``)
    if hasattr(modules, "a1111_version"):
        sd_samplers_kdiffusion = modules.a1111_version("sd_samplers_kdiffusion")
    else:
        from modules import sd_samplers_kdiffusion

    sd = webui.sd
    folder = Path(webui.shared.cmd_opts.lora_dir)
    loras = [(folder / f"{n}.safetensors", (scales or SCALES)[n]) for n in names]
    in_text = (
        loras
        if text_loras is None
        else [lora for lora, n in zip(loras, names, strict=True) if n in text_loras]
    )
    parts = prompt.split(" AND ")

    def encode(model):
        cs = [model([part] * batch) for part in parts]
        uc = model([negative] * batch)
        return _padded(cs, uc, pad, getattr(sd, "cond_stage_model_empty_prompt", None))

    text = merged_copy(sd.cond_stage_model, in_text, "te1")  # the built-in applies the TE parts (shared)
    cs, uc = encode(text)
    own = [(cs, uc)] * len(loras)
    if text_encoders == "per LoRA":
        cs, uc = encode(merged_copy(sd.cond_stage_model, [], "te1"))
        own = [encode(merged_copy(sd.cond_stage_model, [lora], "te1")) for lora in loras]
    base = merged_copy(sd.model.diffusion_model, [], "unet")
    singles = [merged_copy(sd.model.diffusion_model, [lora], "unet") for lora in loras]
    schedule = sd_samplers_kdiffusion.CompVisDenoiser(sd)
    ts = torch.linspace(999, 0, steps)
    sigmas = torch.cat([schedule.t_to_sigma(ts), ts.new_zeros(1)])
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, 4, 8, 8), generator=g) * sigmas[0]
    method = {"d": settings["d"], "tau": settings["tau"], "lam": settings["lam"], "scale": cfg}
    with torch.no_grad():
        for i in range(steps):
            sigma = sigmas[i]
            x_in = x / (sigma**2 + 1) ** 0.5
            t = schedule.sigma_to_t(sigma.expand(batch))
            c_in = 1 / (sigma**2 + 1) ** 0.5

            def eps(model, context):
                out = model(x_in, t, context)  # noqa: B023
                # a v model's output as eps at this sigma: alpha_bar = 1 / (1 + sigma^2)
                return c_in * out + sigma * c_in * x_in if sd.parameterization == "v" else out  # noqa: B023

            base_cs = [eps(base, c) for c in cs]
            loras_cs = [
                torch.stack([eps(m, own_cs[j]) for m, (own_cs, _) in zip(singles, own, strict=True)])
                for j in range(len(parts))
            ]
            base_u = None if i in skip_uncond else eps(base, uc)
            loras_u = torch.stack([eps(m, own_uc) for m, (_, own_uc) in zip(singles, own, strict=True)])
            if len(parts) > 1:
                step_eps = ref.loratorio_step_and(base_cs, base_u, loras_cs, loras_u, **method)
            else:
                keep = None
                if top_k is not None:
                    keep = ref.top_k(ref.similarity(loras_cs[0], base_cs[0], settings["d"]), top_k)
                step_eps = ref.loratorio_step(base_cs[0], base_u, loras_cs[0], loras_u, keep=keep, **method)
            x = x + step_eps.float() * (sigmas[i + 1] - sigma)  # Euler: d = (x - denoised) / sigma = eps
    return x


def _padded(cs, uc, pad, empty):
    """A1111's CFGDenoiser padding of cond and uncond to one token length (one sub-prompt)."""
    if pad is None or cs[0].shape[1] == uc.shape[1]:
        return cs, uc
    (c,) = cs
    if pad == "v0":  # the uncond's last token vector repeated, or the uncond cut
        if uc.shape[1] < c.shape[1]:
            return cs, torch.cat([uc, uc[:, -1:].repeat(1, c.shape[1] - uc.shape[1], 1)], 1)
        return cs, uc[:, : c.shape[1]]
    chunks = (c.shape[1] - uc.shape[1]) // empty.shape[1]  # the empty prompt's chunks appended
    if chunks > 0:
        return cs, torch.cat([uc, empty.repeat(uc.shape[0], chunks, 1)], 1)
    return [torch.cat([c, empty.repeat(c.shape[0], -chunks, 1)], 1)], uc


def test_composes_the_prompts_loras_instead_of_merging_them(webui):
    result, p = generate(webui, PROMPT, ON)
    expected = expected_txt2img(webui, ["l0", "l1"], {"d": 2, "tau": 1.0, "lam": 0.5})
    torch.testing.assert_close(result.images[0], expected[0], atol=2e-4, rtol=1e-4)
    info = result.infotexts[0]
    assert "LoRAtorio: True" in info and "LoRAtorio mode: LoRAtorio" in info and "Lora hashes: l0: " in info


@pytest.mark.parametrize("hires", [False, True], ids=["txt2img", "hires-fix"])
def test_per_lora_text_encoders_give_each_loras_rows_its_own_encoding(webui, hires):
    webui.shared.opts.data["loratorio_text_encoders"] = "per LoRA"
    result, p = generate(webui, PROMPT, ON, enable_hr=hires)
    per_lora_first_pass = generate(webui, PROMPT, ON)[0] if hires else result
    webui.shared.opts.data["loratorio_text_encoders"] = "shared"
    shared, _ = generate(webui, PROMPT, ON, enable_hr=hires)
    settings = {"d": 2, "tau": 1.0, "lam": 0.5}
    if not hires:
        want = expected_txt2img(webui, ["l0", "l1"], settings, text_encoders="per LoRA")
        torch.testing.assert_close(per_lora_first_pass.images[0], want[0], atol=2e-4, rtol=1e-4)
    assert not torch.allclose(result.images[0], shared.images[0], atol=1e-3)
    # the host's own conds and caches are as they were; the built-in's list is back
    assert not any(name in p.__dict__ for name in ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc"))
    assert [net.name for net in webui.networks.loaded_networks] == []  # composed: taken out, as always


def test_per_lora_text_encodings_never_reactivate_the_extra_networks(webui, monkeypatch):
    """Txt2Img's own setup_conds re-activates the networks for its hires conds (in Forge that rebuilds
    forge_objects): the per-LoRA encodings must not go through it."""
    from modules import extra_networks

    calls = []
    activate = extra_networks.activate
    monkeypatch.setattr(extra_networks, "activate", lambda p, data: calls.append(1) or activate(p, data))
    generate(webui, PROMPT, ON, enable_hr=True)
    shared_calls = len(calls)
    webui.shared.opts.data["loratorio_text_encoders"] = "per LoRA"
    calls.clear()
    generate(webui, PROMPT, ON, enable_hr=True)
    assert len(calls) == shared_calls


def test_the_unet_is_never_merged_and_everything_is_put_back(webui):
    unet = webui.sd.model.diffusion_model
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    generate(webui, PROMPT, ON)
    assert all(torch.equal(p, before[n]) for n, p in unet.named_parameters())  # no double application
    assert "apply_model" not in webui.sd.__dict__
    assert all(not m._forward_hooks for m in unet.modules())


def test_with_loratorio_off_nothing_changes_bit_for_bit(webui):
    off = list(ON)
    off[0] = False
    with_off, _ = generate(webui, PROMPT, off)
    without, _ = generate(webui, PROMPT, with_script=False)
    assert torch.equal(with_off.images[0], without.images[0])
    assert with_off.infotexts == without.infotexts


def test_an_exception_inside_a_pass_leaves_the_model_as_it_was(webui):
    unet = webui.sd.model.diffusion_model
    baseline, _ = generate(webui, PROMPT, with_script=False)

    def boom(module, args, output):
        raise RuntimeError("a failing layer")

    handle = unet.out[2].register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="a failing layer"):
        generate(webui, PROMPT, ON)
    handle.remove()
    assert "apply_model" not in webui.sd.__dict__
    assert all(not m._forward_hooks for m in unet.modules())
    after, _ = generate(webui, PROMPT, with_script=False)
    assert torch.equal(after.images[0], baseline.images[0])


def test_interrupt_mid_generation_ends_cleanly(webui):
    from modules import script_callbacks, shared

    calls = []

    def interrupt_at_second_step(params):
        calls.append(params.denoiser.step)
        if params.denoiser.step == 1:
            shared.state.interrupted = True

    script_callbacks.on_cfg_denoiser(interrupt_at_second_step)
    result, _ = generate(webui, PROMPT, ON)
    shared.state.interrupted = False
    assert len(result.images) == 1 and torch.isfinite(result.images[0]).all()
    assert "apply_model" not in webui.sd.__dict__


def test_bad_api_arguments_fail_the_generation_with_a_clear_message(webui):
    with pytest.raises(ValueError, match=r"LoRAtorio argument 1 \(mode\)"):
        generate(webui, PROMPT, [True, "Blend"])
    assert "apply_model" not in webui.sd.__dict__
    ok, _ = generate(webui, PROMPT, with_script=False)
    assert torch.isfinite(ok.images[0]).all()


@pytest.mark.parametrize(
    "opts, kwargs",
    [
        ({"batch_cond_uncond": False}, {}),
        ({}, {"batch_size": 2}),
        ({}, {"batch_size": 2, "n_iter": 2}),
        ({}, {"sampler_name": "Heun"}),
        ({}, {"enable_hr": True}),
    ],
    ids=["separate-cond-uncond-calls", "batch-2", "batch-count-2", "second-order", "hires-fix"],
)
def test_every_generation_mode_runs_composed_and_restored(webui, opts, kwargs):
    webui.shared.opts.data.update(opts)
    result, p = generate(webui, PROMPT, ON, **kwargs)
    webui.shared.opts.data["batch_cond_uncond"] = True
    images = result.images[result.index_of_first_image :]  # after A1111's grid, when there is one
    assert all(torch.isfinite(image).all() for image in images)
    assert len(images) == kwargs.get("batch_size", 1) * kwargs.get("n_iter", 1)
    assert "apply_model" not in webui.sd.__dict__
    if kwargs.get("batch_size") == 2 and "n_iter" not in kwargs:
        expected = expected_txt2img(webui, ["l0", "l1"], {"d": 2, "tau": 1.0, "lam": 0.5}, batch=1)
        torch.testing.assert_close(images[0], expected[0], atol=2e-4, rtol=1e-4)  # its own predictions


def test_separate_cond_and_uncond_calls_give_the_same_image(webui):
    together, _ = generate(webui, PROMPT, ON)
    webui.shared.opts.data["batch_cond_uncond"] = False
    apart, _ = generate(webui, PROMPT, ON)
    webui.shared.opts.data["batch_cond_uncond"] = True
    torch.testing.assert_close(
        apart.images[0], together.images[0], atol=3e-4, rtol=1e-3
    )  # only batch-size round-off differs


def test_the_gated_single_pass_composes_in_either_calling_pattern_and_is_recorded(webui):
    gated = ON + [2, 1]  # exact steps 0, 2, 4; gated single rows on 1, 3, 5
    together, _ = generate(webui, PROMPT, gated, steps=6)
    webui.shared.opts.data["batch_cond_uncond"] = False
    apart, _ = generate(webui, PROMPT, gated, steps=6)
    webui.shared.opts.data["batch_cond_uncond"] = True
    torch.testing.assert_close(apart.images[0], together.images[0], atol=3e-4, rtol=1e-3)
    exact, _ = generate(webui, PROMPT, ON, steps=6)
    assert not torch.allclose(together.images[0], exact.images[0], atol=1e-3)
    info = together.infotexts[0]
    assert "LoRAtorio exact every: 2" in info and "LoRAtorio exact first: 1" in info
    assert "LoRAtorio exact every" not in exact.infotexts[0]


def test_and_prompts_compose_every_sub_prompt(webui):
    """Each AND sub-prompt's cond row is composed with its own weights, the uncond re-centred with
    their mean, and A1111 sums the sub-prompts' guidance."""
    prompt = "a cat AND a hat"
    result, _ = generate(webui, f"{prompt} <lora:l0:0.8> <lora:l1:1.0>", ON)
    want = expected_txt2img(webui, ["l0", "l1"], {"d": 2, "tau": 1.0, "lam": 0.5}, prompt=prompt)
    torch.testing.assert_close(result.images[0], want[0], atol=2e-4, rtol=1e-4)


LONG = "a cat sitting on a red mat near an old wooden door"  # 11 words: three of the fake's chunks


@pytest.mark.parametrize(
    "pad", [None, "pad", "v0"], ids=["unpadded", "pad-cond-uncond", "pad-cond-uncond-v0"]
)
@pytest.mark.parametrize("text_encoders", ["shared", "per LoRA"])
def test_prompts_longer_than_one_chunk_compose_padded_or_not(webui, capsys, pad, text_encoders):
    """A prompt over 75 tokens is several 77-token chunks, the negative prompt one: A1111 runs
    cond and uncond in separate calls, or pads the shorter (empty-prompt chunks, or v0's last token
    repeated); each LoRA's own text encoding is padded the same way."""
    webui.shared.opts.data["pad_cond_uncond"] = pad == "pad"
    webui.shared.opts.data["pad_cond_uncond_v0"] = pad == "v0"
    webui.shared.opts.data["loratorio_text_encoders"] = text_encoders
    result, _ = generate(webui, f"{LONG} <lora:l0:0.8> <lora:l1:1.0>", ON)
    settings = {"d": 2, "tau": 1.0, "lam": 0.5}
    want = expected_txt2img(webui, ["l0", "l1"], settings, prompt=LONG, pad=pad, text_encoders=text_encoders)
    torch.testing.assert_close(result.images[0], want[0], atol=2e-4, rtol=1e-4)
    assert "LoRAtorio" not in capsys.readouterr().err  # no warning: nothing fell back to shared text


@pytest.mark.parametrize(
    "opts, skipped",
    [({"s_min_uncond": 100.0}, {1, 3}), ({"skip_early_cond": 0.5}, {0, 1, 2})],
    ids=["negative-guidance-minimum-sigma", "skip-early-cfg"],
)
def test_steps_without_the_uncond_branch_compose_the_cond_alone(webui, opts, skipped):
    """A1111 drops the uncond rows on some steps (NGMS every other step, or the early steps) and
    guides with the cond prediction alone: e_c there, the full method elsewhere."""
    s_min_uncond = opts.pop("s_min_uncond", None)
    webui.shared.opts.data.update(opts)
    result, _ = generate(webui, PROMPT, ON, s_min_uncond=s_min_uncond)
    want = expected_txt2img(webui, ["l0", "l1"], {"d": 2, "tau": 1.0, "lam": 0.5}, skip_uncond=skipped)
    torch.testing.assert_close(result.images[0], want[0], atol=2e-4, rtol=1e-4)


@pytest.fixture(params=["v-prediction", "sdxl", "inpainting"])
def other_model(request, tmp_path):
    kwargs = {
        "v-prediction": {"parameterization": "v"},
        "sdxl": {"xl": True},
        "inpainting": {"inpaint": True},
    }[request.param]
    sd = FakeSD(**kwargs)
    write_loras(tmp_path / "Lora", sd)
    fake = fake_a1111.install(sd, tmp_path / "Lora")
    spec = importlib.util.spec_from_file_location("loratorio.py", ROOT / "scripts" / "loratorio.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fake.script_class, fake.sd, fake.kind = module.LoRAtorioScript, sd, request.param
    yield fake
    fake_a1111.uninstall()


def test_v_prediction_sdxl_and_inpainting_models_compose_on_eps(other_model):
    webui = other_model
    kwargs = {}
    if webui.kind == "inpainting":
        mask = torch.zeros(1, 1, 8, 8)
        mask[..., 4:] = 1
        kwargs = dict(
            txt2img=False,
            init_latent=torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)),
            mask=mask,
        )
    plain, _ = generate(webui, PROMPT, with_script=False, **kwargs)
    composed, _ = generate(webui, PROMPT, ON, **kwargs)
    assert torch.isfinite(composed.images[0]).all() and not torch.equal(plain.images[0], composed.images[0])
    assert "apply_model" not in webui.sd.__dict__
    if webui.kind == "v-prediction":
        expected = expected_txt2img(webui, ["l0", "l1"], {"d": 2, "tau": 1.0, "lam": 0.5})
        torch.testing.assert_close(composed.images[0], expected[0], atol=3e-4, rtol=1e-4)
        # the conversion both ways at fractional timesteps, as k-diffusion interpolates them
        from loratorio_extension.a1111 import _v_conversions

        to_eps, from_eps = _v_conversions(webui.sd.alphas_cumprod)
        inputs = {"x": torch.randn(3, 4, 8, 8), "t": torch.tensor([10.0, 500.5, 998.2])}
        v = torch.randn(3, 4, 8, 8)
        torch.testing.assert_close(from_eps(to_eps(v, inputs), inputs), v, atol=1e-4, rtol=1e-4)


@pytest.fixture
def edit_model(tmp_path):
    sd = FakeSD(edit=True)
    write_loras(tmp_path / "Lora", sd)
    fake = fake_a1111.install(sd, tmp_path / "Lora")
    spec = importlib.util.spec_from_file_location("loratorio.py", ROOT / "scripts" / "loratorio.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fake.script_class, fake.sd = module.LoRAtorioScript, sd
    yield fake
    fake_a1111.uninstall()


def test_an_edit_model_at_an_image_cfg_scale_is_left_to_a1111_with_a_warning(edit_model, capsys):
    """instruct-pix2pix at Image CFG scale 1.5: A1111 batches cond, uncond and image-free uncond
    rows, a third branch the method does not define. The generation runs as without LoRAtorio
    (the built-in merges the LoRAs), the console says why, the infotext claims nothing; at Image
    CFG scale 1 A1111 batches two branches and the LoRAs are composed."""
    webui = edit_model
    unet = webui.sd.model.diffusion_model
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    kwargs = dict(txt2img=False, init_latent=init)
    plain, _ = generate(webui, PROMPT, with_script=False, **kwargs)
    refused, _ = generate(webui, PROMPT, ON, **kwargs)
    assert torch.equal(refused.images[0], plain.images[0])
    assert "Image CFG scale 1.5" in capsys.readouterr().err
    assert "LoRAtorio" not in refused.infotexts[0]
    assert "apply_model" not in webui.sd.__dict__ and all(not m._forward_hooks for m in unet.modules())
    plain_1, _ = generate(webui, PROMPT, with_script=False, image_cfg_scale=1.0, **kwargs)
    composed, _ = generate(webui, PROMPT, ON, image_cfg_scale=1.0, **kwargs)
    assert torch.isfinite(composed.images[0]).all() and not torch.equal(composed.images[0], plain_1.images[0])
    assert "LoRAtorio: True" in composed.infotexts[0]


def test_img2img_composes_from_the_init_latent(webui):
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    plain, _ = generate(webui, PROMPT, with_script=False, txt2img=False, init_latent=init)
    composed, _ = generate(webui, PROMPT, ON, txt2img=False, init_latent=init)
    assert torch.isfinite(composed.images[0]).all() and not torch.equal(plain.images[0], composed.images[0])


def test_rows_per_forward_setting_gives_the_same_image(webui):
    whole, _ = generate(webui, PROMPT, ON)
    webui.shared.opts.data["loratorio_max_rows"] = 3
    chunked, _ = generate(webui, PROMPT, ON)
    del webui.shared.opts.data["loratorio_max_rows"]
    torch.testing.assert_close(
        chunked.images[0], whole.images[0], atol=3e-4, rtol=1e-3
    )  # batch round-off only


def test_auto_compose_turns_loratorio_on_for_two_or_more_prompt_loras(webui):
    off = [False] + ON[1:]
    on, _ = generate(webui, PROMPT, ON)
    webui.shared.opts.data["loratorio_auto_compose"] = True
    auto, _ = generate(webui, PROMPT, off)
    single, _ = generate(webui, "a cat <lora:l0:0.8>", off)
    webui.shared.opts.data["loratorio_auto_compose"] = False
    merged_single, _ = generate(webui, "a cat <lora:l0:0.8>", with_script=False)
    assert torch.equal(auto.images[0], on.images[0])
    assert torch.equal(single.images[0], merged_single.images[0])  # one LoRA: left to the built-in


def test_settings_section_is_registered(webui):
    from modules import script_callbacks

    script_callbacks.ui_settings_callback()
    labels = webui.shared.opts.data_labels
    assert {"loratorio_max_rows", "loratorio_auto_compose", "loratorio_default_weighting"} <= set(labels)
    assert "loratorio_default_tau" in labels and "loratorio_default_temperature" not in labels  # softmin's
    assert all(labels[k].section == ("loratorio", "LoRAtorio") for k in labels if k.startswith("loratorio_"))


def test_show_weight_maps_adds_one_overlay_per_lora_and_image(webui):
    maps_after_the_grid(webui, grid=False)


def test_with_batch_2_the_weight_maps_follow_their_images_never_the_grid(webui):
    maps_after_the_grid(webui, grid=True)


def maps_after_the_grid(webui, grid: bool):
    webui.shared.opts.data["return_grid"] = grid
    maps_on = list(ON)
    maps_on[8] = True
    result, _ = generate(webui, PROMPT, maps_on, batch_size=2)
    webui.shared.opts.data["return_grid"] = True
    first = result.index_of_first_image
    assert first == (1 if grid else 0)
    if grid:  # A1111 puts the grid of the two images first
        assert result.images[0].shape == (4, 8, 16) and result.infotexts[0] == result.infotexts[1]
    maps = result.images[first + 2 :]
    assert len(maps) == 2 * 2  # one per LoRA and image
    assert result.infotexts[first + 2 :] == ["LoRAtorio weight map: l0", "LoRAtorio weight map: l1"] * 2
    assert all(m.shape == (3, 64, 64) for m in maps)  # over a 64x64 image, none over the 64x128 grid
    assert not torch.equal(maps[0], maps[2])  # each image's own weights


def fake_xyz():
    import types

    from modules import scripts

    module = types.ModuleType("xyz_grid.py")

    class AxisOption:
        def __init__(
            self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None
        ):
            self.label, self.type, self.apply, self.choices = label, type, apply, choices

    module.AxisOption, module.axis_options = AxisOption, []
    script_class = type("Script", (), {"__module__": "xyz_grid.py"})
    scripts.scripts_data.append(scripts.ScriptClassData(script_class, "xyz_grid.py", "", module))
    return module


def test_xyz_axes_set_the_cells_settings(webui):
    import copy as copy_

    from modules import processing, script_callbacks, scripts

    xyz = fake_xyz()
    script_callbacks.before_ui_callback()
    script_callbacks.before_ui_callback()  # a UI reload must not add them twice
    labels = [o.label for o in xyz.axis_options]
    assert labels == [
        "[LoRAtorio] Enabled",
        "[LoRAtorio] Mode",
        "[LoRAtorio] Patch size",
        "[LoRAtorio] Weighting",
        "[LoRAtorio] Temperature",
        "[LoRAtorio] Re-centering (lam)",
        "[LoRAtorio] Top-k",
        "[LoRAtorio] Exact every (gated)",
        "[LoRAtorio] Exact first (gated)",
        "[LoRAtorio] Negative branch LoRAs",
    ]
    mode_axis = xyz.axis_options[1]
    runner = scripts.ScriptRunner([webui.script_class()])
    cells = {}
    for mode in ("LoRAtorio", "Composite"):
        p = txt2img(runner, runner.default_args())
        cell = copy_.copy(p)
        mode_axis.apply(cell, mode, None)
        cells[mode] = processing.process_images(cell)
    for mode, result in cells.items():
        defaults = (
            runner.default_args()
        )  # the cell kept the UI's values, the axis set the mode and turned it on
        direct, _ = generate(webui, PROMPT, [True, mode] + defaults[2:])
        assert torch.equal(result.images[0], direct.images[0]), mode
    assert not torch.equal(cells["LoRAtorio"].images[0], cells["Composite"].images[0])
    assert f"LoRAtorio mode: {'Composite'}" in cells["Composite"].infotexts[0]


def test_reusing_the_positive_lora_change_on_the_negative_is_recorded_pasted_back_and_plotted(webui):
    from modules import processing, script_callbacks, scripts

    from extension.args import parse_args

    evaluated, _ = generate(webui, PROMPT, ON)
    reused, _ = generate(webui, PROMPT, ON + [1, 3, "contrast", "reuse"])
    assert not torch.equal(evaluated.images[0], reused.images[0])
    info = reused.infotexts[0]
    assert "LoRAtorio uncond LoRAs: reuse" in info and "uncond LoRAs" not in evaluated.infotexts[0]
    params = dict(part.split(": ", 1) for part in info.splitlines()[-1].split(", "))
    runner = scripts.ScriptRunner([webui.script_class()])
    pasted = {component.label: paste(params) for component, paste in runner.infotext_fields}
    assert pasted["Negative branch LoRAs (lam < 1; reuse: faster)"] == "reuse"
    # the X/Y/Z axis gives the same picture as the argument
    xyz = fake_xyz()
    script_callbacks.before_ui_callback()
    axis = next(o for o in xyz.axis_options if o.label == "[LoRAtorio] Negative branch LoRAs")
    assert axis.choices() == ["evaluate", "reuse"]
    p = txt2img(runner, ON)
    axis.apply(p, "reuse", None)
    assert torch.equal(processing.process_images(p).images[0], reused.images[0])
    with pytest.raises(ValueError, match="argument 12 \\(uncond_loras\\) must be one of evaluate, reuse"):
        parse_args(ON + [1, 3, "contrast", "skip"])


def test_infotext_fields_paste_the_settings_back(webui):
    from modules import scripts

    script = webui.script_class()
    runner = scripts.ScriptRunner([script])
    result, _ = generate(webui, PROMPT, [True, "Switch", 8, 0.2, 0.75, "", 0, 1, False])
    line = result.infotexts[0].splitlines()[-1]
    params = dict(part.split(": ", 1) for part in line.split(", "))
    pasted = {component.label: paste(params) for component, paste in runner.infotext_fields}
    # None: not in this infotext, so A1111 leaves the field as it is; the keys written only when
    # on (pool, top-k, gated) paste as off when absent
    assert {k: v for k, v in pasted.items() if v is not None} == {
        "LoRAtorio": True,
        "Mode": "Switch",
        "Patch size (fraction or pixels)": "8",
        "Weighting": "contrast",
        "Temperature (tau)": 0.2,
        "Re-centering (lam)": 0.75,
        "Pool (folder or named pool)": "",
        "Top-k (0: all)": 0,
        "Exact every K steps (1: every step; more: gated single pass between, faster)": 1,
        "Negative branch LoRAs (lam < 1; reuse: faster)": "evaluate",  # absent: every LoRA ran it
    }


def test_a_pool_without_prompt_tags_is_composed_keeping_the_top_k(webui, tmp_path):
    folder = Path(webui.shared.cmd_opts.lora_dir)
    pooled = [True, "LoRAtorio", 2, 1.0, 0.5, str(folder), 2, 1, False]
    result, _ = generate(webui, "a cat", pooled, batch_size=2)
    plain, _ = generate(webui, "a cat", with_script=False, batch_size=2)
    assert not torch.equal(result.images[0], plain.images[0])
    for info in result.infotexts:  # each image records the two LoRAs it kept
        kept = info.split("LoRAtorio kept: ")[1].split(", Lora")[0].split(", ")
        assert len(kept) == 2 and set(kept) <= {"l0", "l1", "l2"}
    assert "apply_model" not in webui.sd.__dict__


def test_top_k_keeps_the_prompts_loras_and_the_pool_loras_its_words_name_by_their_tags(webui, tmp_path):
    import json

    from loratorio_core.lora import load_lora

    folder, tagged = Path(webui.shared.cmd_opts.lora_dir), tmp_path / "tagged"
    tagged.mkdir()
    for name, trigger in (("l0", "zorp"), ("l1", "quix"), ("l2", "blen")):  # kohya's caption tags
        tags = {f"10_{trigger}": {trigger: 30, "cat": 30, "solo": 12}}
        layers = load_lora(folder / f"{name}.safetensors").layers
        save_lora(tagged / f"t_{trigger}.safetensors", layers, {"ss_tag_frequency": json.dumps(tags)})

    def kept(prompt, batch_size=1):
        result, _ = generate(
            webui, prompt, [True, "LoRAtorio", 2, 1.0, 0.5, str(tagged), 2, 1, False], batch_size=batch_size
        )
        return [
            set(info.split("LoRAtorio kept: ")[1].split(", Lora")[0].split(", ")) for info in result.infotexts
        ]

    # the prompt's words name two pool LoRAs (the shared "cat" names none): they are the top 2
    batch = kept("a cat, zorp and (blen:1.1)", batch_size=2)  # the grid's infotext, then each image's
    assert len(batch) == 3 and all(k == {"t_zorp", "t_blen"} for k in batch)
    # a LoRA of the prompt's own tags is always asked for; the pool fills up with what is named
    assert kept("a cat <lora:l1:0.8>, quix") == [{"l1", "t_quix"}]
    assert "apply_model" not in webui.sd.__dict__


def test_pools_by_name_and_by_lora_names_and_a_clear_error_for_unknown_ones(webui, tmp_path):
    from loratorio_extension import pools

    def resolved(pool):
        return [(path.stem, scale) for path, scale in pools.resolve(pool, available, tmp_path / "pools.json")]

    pools.save_pool("styles", ["l0", "l2:0.5"], tmp_path / "pools.json")
    available = webui.networks.available_network_aliases
    folder = webui.shared.cmd_opts.lora_dir
    assert resolved("styles") == [("l0", 1.0), ("l2", 0.5)]
    assert resolved("l1, l2") == [("l1", 1.0), ("l2", 1.0)]
    assert resolved("l0:0.7, l1") == [("l0", 0.7), ("l1", 1.0)]  # an entry may carry its scale
    assert resolved(f"{folder}:0.25") == [("l0", 0.25), ("l1", 0.25), ("l2", 0.25)]
    with pytest.raises(ValueError, match="no folder, named pool or LoRA called nope"):
        resolved("nope")
    with pytest.raises(ValueError, match="LoRAtorio pool 'l0:abc': 'l0:abc': 'abc' is not a scale"):
        resolved("l0:abc")
    with pytest.raises(ValueError, match="'l0:x': 'x' is not a scale"):
        pools.save_pool("bad", ["l0:x"], tmp_path / "pools.json")
    with pytest.raises(ValueError, match="LoRAtorio pool 'nope'"):
        generate(webui, "a cat", [True, "LoRAtorio", 2, 1.0, 0.5, "nope", 2])
    assert "apply_model" not in webui.sd.__dict__


def test_pool_loras_are_composed_at_the_scale_their_entry_gives(webui, monkeypatch):
    from loratorio_extension import session

    composed = []
    compose = session.Session.compose

    def record(self, p, unet, adapters, layers):
        composed.append([(a.name, a.scale) for a in adapters])
        return compose(self, p, unet, adapters, layers)

    monkeypatch.setattr(session.Session, "compose", record)
    generate(webui, "a cat <lora:l2:0.6>", [True, "LoRAtorio", 2, 1.0, 0.5, "l0:0.7, l1, l2:0.1", 0])
    assert composed == [[("l2", 0.6), ("l0", 0.7), ("l1", 1.0)]]  # the prompt's tag keeps its own


def test_controls_whose_default_changed_take_labels_no_saved_ui_config_holds(webui):
    # ui-config.json keys a control's value by its label; an upgraded WebUI holds the old labels'
    # old defaults (patch 4, softmin's temperature 1.0), which would override the new ones.
    from modules import scripts

    script = webui.script_class()
    labels = [component.label for component, _ in scripts.ScriptRunner([script]).infotext_fields]
    module = importlib.import_module(type(script).__module__)
    assert {module.PATCH_LABEL, module.TEMPERATURE_LABEL} <= set(labels)
    assert not set(module.OLD_LABELS) & set(labels)


def test_tooltips_cover_every_setting_of_the_accordion():
    import re

    labels = set(re.findall(r'(?:label=|_LABEL = )"([^"]+)"', (ROOT / "extension" / "script.py").read_text()))
    tips = set(re.findall(r'"([^"]+)": "', (ROOT / "javascript" / "loratorio.js").read_text()))
    assert labels == tips


def test_the_tab_builds_names_pools_and_shows_trigger_words(webui, tmp_path, monkeypatch):
    import json as json_

    from loratorio_extension import pools, tab
    from modules import script_callbacks

    folder = Path(webui.shared.cmd_opts.lora_dir)
    save_lora(
        folder / "tagged.safetensors",
        {
            ("unet", "input_blocks_1_1_proj_in"): LayerUpdate(
                down=torch.randn(2, 32, 1, 1), up=torch.randn(32, 2, 1, 1)
            )
        },
        {"ss_tag_frequency": json_.dumps({"10_knight": {"knight": 40, "armor": 25, "sword": 3}})},
    )
    assert "tagged" in tab.refresh()
    assert tab.describe(["tagged", "l0", "ghost"]).splitlines() == [
        "- **tagged**: knight, armor, sword",
        "- **l0**: no trigger words in its metadata",
        "- **ghost**: not in the LoRA list (refresh it)",
    ]
    assert "No pools yet" in tab.pool_table()
    assert tab.save("knights", ["tagged", "l0"]) == "- **knights**: tagged, l0"
    assert pools.read_pools() == {"knights": ["tagged", "l0"]}
    assert tab.save("knights", ["tagged:0.7", "l0"]) == "- **knights**: tagged:0.7, l0"
    assert tab.describe(["tagged:0.7"]) == "- **tagged**: knight, armor, sword"
    assert tab.save("knights", ["l0:x"]) == "**'l0:x': 'x' is not a scale (write NAME:0.8)**"
    assert tab.save("knights", []).startswith("No pools yet")  # an empty choice deletes it
    assert tab.save("  ", ["l0"]) == "**a pool needs a name**"
    tabs = script_callbacks.ui_tabs_callback()
    assert not webui.errors.reported  # the tab built: gradio 3 did not refuse a component
    assert [(title, elem_id) for _, title, elem_id in tabs] == [("LoRAtorio", "loratorio_tab")]
    # gradio 3.41.2 (A1111 1.10) refuses typed entries in a multiselect dropdown: the scales are
    # typed in a textbox beside it, and take the place of the chosen entry of their name
    assert tab.save("knights", ["tagged", "l0"], "l0:0.5, l1:2") == "- **knights**: tagged, l0:0.5, l1:2"
    assert tab.save("knights", ["l0"], "l0:y") == "**'l0:y': 'y' is not a scale (write NAME:0.8)**"
    assert pools.read_pools() == {"knights": ["tagged", "l0:0.5", "l1:2"]}


def test_api_alwayson_args_take_defaults_for_what_is_missing(webui):
    # As A1111's init_script_args: the UI defaults, then the request's args by position.
    from modules import processing, scripts

    runner = scripts.ScriptRunner([webui.script_class()])
    script = runner.alwayson_scripts[0]
    assert script.name == "loratorio"  # the key of alwayson_scripts
    args = runner.default_args()
    request = {"loratorio": {"args": [True, "LoRAtorio", 2, 1.0, 0.5]}}
    for index, value in enumerate(request[script.name]["args"][: script.args_to - script.args_from]):
        args[script.args_from + index] = value
    p = txt2img(runner, args)
    via_api = processing.process_images(p)
    direct, _ = generate(webui, PROMPT, ON)
    assert torch.equal(via_api.images[0], direct.images[0])


def test_skip_mid_generation_ends_cleanly_and_the_next_image_is_composed(webui):
    from modules import script_callbacks, shared

    def skip_at_second_step(params):
        if params.denoiser.step == 1 and not getattr(shared.state, "_done", False):
            shared.state.skipped = shared.state._done = True

    script_callbacks.on_cfg_denoiser(skip_at_second_step)
    skipped, _ = generate(webui, PROMPT, ON)
    shared.state.skipped = False
    assert torch.isfinite(skipped.images[0]).all() and "apply_model" not in webui.sd.__dict__
    composed, _ = generate(webui, PROMPT, ON)
    expected = expected_txt2img(webui, ["l0", "l1"], {"d": 2, "tau": 1.0, "lam": 0.5})
    torch.testing.assert_close(composed.images[0], expected[0], atol=3e-4, rtol=1e-4)


@pytest.mark.parametrize("hires", [False, True])
def test_older_a1111_without_the_sampling_hook_gives_the_same_image(webui, hires):
    # A1111 before 1.9: its runner has no process_before_every_sampling, and processing never calls it.
    from modules import processing, scripts

    with_hook, _ = generate(webui, PROMPT, ON, enable_hr=hires)

    class OldRunner(scripts.ScriptRunner):
        pass

    del scripts.ScriptRunner.process_before_every_sampling  # restored below
    try:
        runner = OldRunner([webui.script_class()])
        runner.process_before_every_sampling = lambda *a, **k: None  # what old processing code would not call
        p = txt2img(runner, ON, enable_hr=hires)
        old = processing.process_images(p)
    finally:
        scripts.ScriptRunner.process_before_every_sampling = _sampling_hook
    torch.testing.assert_close(old.images[0], with_hook.images[0], atol=3e-4, rtol=1e-4)
    assert "apply_model" not in webui.sd.__dict__


def _sampling_hook(self, p, **kwargs):
    self._run("process_before_every_sampling", p, **kwargs)


def test_a_lycoris_norm_layer_leaves_its_lora_to_the_builtins_merge_with_one_console_line(webui, capsys):
    """A1111's NetworkModuleNorm (w_norm/b_norm on a GroupNorm or LayerNorm) is no delta the per-row
    runtime can add: that LoRA is merged by the built-in as without LoRAtorio, the others composed."""
    import safetensors.torch

    folder = Path(webui.shared.cmd_opts.lora_dir)
    tensors = safetensors.torch.load_file(str(folder / "l0.safetensors"))
    unet = webui.sd.model.diffusion_model
    group_norm = unet.input_blocks[1][0].in_layers[0]
    layer_norm = unet.input_blocks[1][1].transformer_blocks[0].norm1
    assert isinstance(group_norm, nn.GroupNorm) and isinstance(layer_norm, nn.LayerNorm)
    for key, norm in (
        ("lora_unet_input_blocks_1_0_in_layers_0", group_norm),
        ("lora_unet_input_blocks_1_1_transformer_blocks_0_norm1", layer_norm),
    ):
        tensors[f"{key}.w_norm"] = torch.full_like(norm.weight, 0.1)
        tensors[f"{key}.b_norm"] = torch.full_like(norm.bias, 0.05)
    safetensors.torch.save_file(tensors, str(folder / "normed.safetensors"))
    webui.networks.list_available_networks()
    group_before = (group_norm.weight.detach().clone(), group_norm.bias.detach().clone())
    capsys.readouterr()

    result, _ = generate(webui, "a cat <lora:normed:0.8> <lora:l1:1.0>", ON)

    assert webui.errors.reported == [] and torch.isfinite(result.images[0]).all()
    lines = [line for line in capsys.readouterr().err.splitlines() if "normed" in line]
    assert len(lines) == 1, lines
    assert "Norm layer" in lines[0] and "merged as usual instead of composed" in lines[0]
    # the built-in merged it (norm layers included), as it does without LoRAtorio
    assert torch.allclose(group_norm.weight, group_before[0] + 0.08)
    assert torch.allclose(group_norm.bias, group_before[1] + 0.04)
    assert "LoRAtorio: True" in result.infotexts[0]  # l1 was composed
    assert "apply_model" not in webui.sd.__dict__ and all(not m._forward_hooks for m in unet.modules())


def test_when_nothing_is_composed_no_settings_are_recorded_and_the_user_is_told(webui, capsys):
    """A tag the host cannot load leaves no LoRA to compose: the image is plain, so its infotext
    must not claim a composition, and the console and the generation's warnings say why."""
    prompt = "a cat <lora:ghost:1.0>"
    result, p = generate(webui, prompt, ON)
    plain, _ = generate(webui, prompt, with_script=False)
    assert torch.equal(result.images[0], plain.images[0])
    assert "LoRAtorio" not in result.infotexts[0]
    assert result.infotexts == plain.infotexts
    said = [line for line in capsys.readouterr().err.splitlines() if "nothing composed" in line]
    assert len(said) == 1 and "made without LoRAtorio" in said[0]
    assert result.comments.startswith("LoRAtorio: nothing composed")  # shown under the image


def test_the_per_lora_text_encoder_setting_names_no_single_host():
    from extension import options

    label = options.OPTIONS["loratorio_text_encoders"][1]
    assert "per LoRA" in label and "A1111" not in label  # it works in A1111 and both Forges


@pytest.mark.parametrize(
    "patch, grids", [("1/4", [(4, 4), (4, 4)]), ("2", [(4, 4), (8, 8)])], ids=["fraction", "absolute"]
)
def test_a_fractional_patch_size_resolves_per_pass_and_an_absolute_one_does_not(
    webui, monkeypatch, patch, grids
):
    """64 px -> an 8x8 latent, hires 2x -> 16x16: 1/4 of the side is 2 then 4 latent pixels (a 4x4
    patch grid in both passes), an absolute 2 stays 2 (a finer 8x8 grid in the hires pass)."""
    from loratorio_extension import session

    composers = []
    compose = session.Session.compose

    def keep(self, p, unet, adapters, layers):
        compose(self, p, unet, adapters, layers)
        composers.append(self.rows)

    monkeypatch.setattr(session.Session, "compose", keep)
    args = [True, "LoRAtorio", patch, 1.0, 0.5, "", 0, 1, True]  # maps on: the weights are recorded
    result, _ = generate(webui, PROMPT, args, enable_hr=True)
    assert [tuple(next(iter(rows.weights.values()))[0].shape[1:]) for rows in composers] == grids
    assert f"LoRAtorio patch size: {patch}" in result.infotexts[0]


def test_the_xyz_patch_size_axis_takes_fractions_and_absolute_sizes(webui):
    import copy as copy_

    from modules import processing, scripts

    xyz = fake_xyz()
    from loratorio_extension import xyz as ours

    ours.register()
    axis = next(o for o in xyz.axis_options if o.label == "[LoRAtorio] Patch size")
    assert axis.type is str and {"1/16", "1/8", "4"} <= set(axis.choices())
    runner = scripts.ScriptRunner([webui.script_class()])
    for value in ("1/4", "2"):
        p = txt2img(runner, runner.default_args())
        cell = copy_.copy(p)
        axis.apply(cell, value, None)
        plotted = processing.process_images(cell)
        direct, _ = generate(webui, PROMPT, [True, "LoRAtorio", value] + runner.default_args()[3:])
        assert torch.equal(plotted.images[0], direct.images[0]), value
    # on the 8x8 latent 1/4 is 2 latent pixels: the same image as an absolute 2
    assert torch.equal(
        generate(webui, PROMPT, [True, "LoRAtorio", "1/4"])[0].images[0],
        generate(webui, PROMPT, [True, "LoRAtorio", 2])[0].images[0],
    )
