"""LoRAtorio on diffusers pipelines, checked against diffusers itself and a by-hand loop on merged copies."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from loratorio_core import LoRAtorioConfig
from loratorio_core.integrations.diffusers import LoRAtorioDiffusers
from loratorio_core.lora import LayerUpdate, LoRAFileError, load_lora, save_lora

import reference as ref
from tiny_pipes import tiny_sd, tiny_sdxl


def random_lora(path, pipe, seed: int, rank: int = 4, text_encoder: bool = False, strength: float = 0.4):
    """A kohya file touching every attention and conv layer of the UNet (and the first text encoder)."""
    g = torch.Generator().manual_seed(seed)
    layers = {}

    def add(component, model, keep):
        for name, module in model.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)) or not keep(name):
                continue
            w = module.weight
            kernel = w.shape[2:] if w.dim() == 4 else ()
            down = torch.randn(rank, w.shape[1], *kernel, generator=g) * strength / w.shape[1] ** 0.5
            up = torch.randn(w.shape[0], rank, *(1,) * len(kernel), generator=g) * strength
            layers[(component, name.replace(".", "_"))] = LayerUpdate(down=down, up=up, alpha=float(rank))

    add("unet", pipe.unet, lambda n: ("attentions" in n or "resnets" in n) and "norm" not in n)
    if text_encoder:
        add("te1", pipe.text_encoder, lambda n: "layers" in n)
    save_lora(path, layers)
    return path


def merged(pipe, loras_scales):
    """A copy of the pipeline with LoRAs merged into its weights: the independent reference."""
    out = copy.copy(pipe)
    for attribute, component in (("unet", "unet"), ("text_encoder", "te1")):
        model = copy.deepcopy(getattr(pipe, attribute))
        modules = {n.replace(".", "_"): m for n, m in model.named_modules()}
        with torch.no_grad():
            for lora, scale in loras_scales:
                for path, update in lora.component(component).items():
                    module = modules[path]
                    module.weight += scale * update.delta_weight(module.weight.shape)
        setattr(out, attribute, model)
    return out


def by_hand(pipe, loras, scales, config, prompt, steps, guidance, size=16):
    """The method written out step by step: every LoRA's prediction from its own merged pipeline."""
    base = merged(pipe, [])
    singles = [merged(pipe, [(lora, s)]) for lora, s in zip(loras, scales, strict=True)]

    def encode(p):
        return p.encode_prompt([prompt], "cpu", 1, True, [""])

    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps)
    latents = (
        torch.randn((1, 4, size // 2, size // 2), generator=torch.Generator().manual_seed(0))
        * scheduler.init_noise_sigma
    )
    conds = [encode(p) for p in [base, *singles]]
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(latents, t)

            def eps(p, context):
                return p.unet(x, t, encoder_hidden_states=context).sample  # noqa: B023

            base_c, base_u = eps(base, conds[0][0]), eps(base, conds[0][1])
            loras_c = torch.stack([eps(p, c[0]) for p, c in zip(singles, conds[1:], strict=True)])
            loras_u = torch.stack([eps(p, c[1]) for p, c in zip(singles, conds[1:], strict=True)])
            guided = ref.loratorio_step(
                base_c,
                base_u,
                loras_c,
                loras_u,
                d=config.patch_size,
                tau=config.temperature,
                lam=config.recenter,
                scale=guidance,
                reuse=config.uncond_loras == "reuse",
            )
            latents = scheduler.step(guided.float(), t, latents).prev_sample
    return latents


@pytest.fixture
def sd(tmp_path):
    pipe = tiny_sd(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_without_loras_it_is_diffusers_own_pipeline_exactly(sd, tmp_path):
    ours = LoRAtorioDiffusers(sd, [])(
        "a red cube", "blurry", steps=4, guidance_scale=6.0, height=16, width=16, output_type="latent"
    )
    theirs = sd(
        "a red cube",
        negative_prompt="blurry",
        num_inference_steps=4,
        guidance_scale=6.0,
        height=16,
        width=16,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images
    assert torch.equal(ours.latents, theirs)
    assert ours.rows == [2] * 4


@pytest.mark.parametrize(
    "scheduler, prediction", [("euler", "epsilon"), ("dpm", "v_prediction"), ("euler", "v_prediction")]
)
def test_sdxl_without_loras_matches_diffusers_for_any_scheduler_and_prediction_type(
    tmp_path, scheduler, prediction
):
    pipe = tiny_sdxl(tmp_path, scheduler, prediction)
    pipe.set_progress_bar_config(disable=True)
    ours = LoRAtorioDiffusers(pipe, [])(
        "a red cube", "blurry", steps=3, guidance_scale=6.0, height=16, width=16, output_type="latent"
    )
    theirs = pipe(
        "a red cube",
        negative_prompt="blurry",
        num_inference_steps=3,
        guidance_scale=6.0,
        height=16,
        width=16,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images
    # eps models: identical; v models: up to the round-off of converting v -> eps -> v
    torch.testing.assert_close(ours.latents, theirs, atol=1e-4 if prediction != "epsilon" else 0, rtol=0)


@pytest.mark.parametrize(
    "text_encoder, uncond_loras",
    [(False, "evaluate"), (True, "evaluate"), (True, "reuse")],
    ids=["unet-only", "with-text-encoder", "reused-uncond"],
)
def test_composition_equals_the_method_written_out_on_merged_copies(sd, tmp_path, text_encoder, uncond_loras):
    paths = [
        random_lora(tmp_path / f"l{i}.safetensors", sd, seed=i, text_encoder=text_encoder) for i in range(3)
    ]
    loras = [load_lora(p) for p in paths]
    scales = [0.8, 1.0, 0.6]
    config = LoRAtorioConfig(patch_size=2, temperature=1.0, recenter=0.5, uncond_loras=uncond_loras)
    ours = LoRAtorioDiffusers(sd, paths, scales, config)(
        "a red cube", steps=3, guidance_scale=5.0, height=16, width=16, output_type="latent"
    )
    expected = by_hand(sd, loras, scales, config, "a red cube", steps=3, guidance=5.0)
    torch.testing.assert_close(ours.latents, expected, atol=2e-4, rtol=1e-4)
    plain = LoRAtorioDiffusers(sd, [])(
        "a red cube", steps=3, guidance_scale=5.0, height=16, width=16, output_type="latent"
    )
    assert (ours.latents - plain.latents).abs().max() > 1e-2  # the LoRAs did something
    assert ours.rows == [8 if uncond_loras == "evaluate" else 5] * 3  # 2N + 2, or N + 2 reusing


def test_chunked_rows_give_identical_results(sd, tmp_path):
    # float64: chunking itself changes nothing; in float32 the only difference is the GEMM
    # round-off of other batch sizes, which guidance and a small temperature amplify.
    paths = [random_lora(tmp_path / f"l{i}.safetensors", sd, seed=i) for i in range(3)]
    sd.to(torch.float64)
    whole = LoRAtorioDiffusers(sd, paths)(
        "a cube", steps=2, height=16, width=16, output_type="latent", num_images_per_prompt=2
    )
    for max_rows in (1, 3, 7):
        chunked = LoRAtorioDiffusers(sd, paths, max_rows=max_rows)(
            "a cube", steps=2, height=16, width=16, output_type="latent", num_images_per_prompt=2
        )
        torch.testing.assert_close(chunked.latents, whole.latents, atol=1e-10, rtol=1e-10)


def test_merge_mode_is_the_pipeline_with_every_lora_merged(sd, tmp_path):
    paths = [random_lora(tmp_path / f"l{i}.safetensors", sd, seed=i, text_encoder=True) for i in range(2)]
    loras = [load_lora(p) for p in paths]
    ours = LoRAtorioDiffusers(sd, paths, [0.7, 1.1], LoRAtorioConfig(mode="merge"))(
        "a cube", steps=3, height=16, width=16, output_type="latent"
    )
    fused = merged(sd, [(loras[0], 0.7), (loras[1], 1.1)])
    theirs = LoRAtorioDiffusers(fused, [])("a cube", steps=3, height=16, width=16, output_type="latent")
    torch.testing.assert_close(ours.latents, theirs.latents, atol=1e-4, rtol=1e-4)


def test_every_mode_and_dynamic_selection_run_through_the_same_path(sd, tmp_path):
    paths = [random_lora(tmp_path / f"l{i}.safetensors", sd, seed=i) for i in range(4)]
    rows = {}
    for mode in ("loratorio", "composite", "switch", "merge"):
        result = LoRAtorioDiffusers(sd, paths, config=LoRAtorioConfig(mode=mode, recenter=1.0))(
            "a cube", steps=2, height=16, width=16, output_type="latent"
        )
        rows[mode] = result.rows[0]
        assert torch.isfinite(result.latents).all()
    assert rows == {"loratorio": 6, "composite": 8, "switch": 2, "merge": 2}
    pool = LoRAtorioDiffusers(sd, paths, config=LoRAtorioConfig(top_k=2, reselect_every=2, recenter=1.0))
    result = pool(
        "a cube",
        steps=4,
        height=16,
        width=16,
        output_type="latent",
        num_images_per_prompt=2,
        record_weights=True,
    )
    assert all(kept.sum(0).tolist() == [2, 2] for kept in result.kept)
    # selection steps evaluate the pool; between them, the LoRAs some sample kept
    kept_by_any = int(result.kept[0].any(1).sum())
    assert result.rows == [6, 2 + kept_by_any, 6, 2 + int(result.kept[2].any(1).sum())]
    assert result.weights[0].shape == (4, 2, 8, 8)  # the default patch: 1/16 of the 8x8 latent is 1


def test_top_k_keeps_the_loras_each_prompt_names_by_their_training_tags(sd, tmp_path):
    import json

    triggers = ["zorp", "quix", "blen", "morv"]
    paths = []
    for i, trigger in enumerate(triggers):
        lora = load_lora(random_lora(tmp_path / f"raw{i}.safetensors", sd, seed=i))
        tags = {f"10_{trigger}": {trigger: 20, "1girl": 20, "solo": 7}}  # kohya's dataset -> tag counts
        paths.append(tmp_path / f"{trigger}.safetensors")
        save_lora(paths[-1], lora.layers, {"ss_tag_frequency": json.dumps(tags)})
    pool = LoRAtorioDiffusers(sd, paths, config=LoRAtorioConfig(top_k=2, recenter=1.0))
    result = pool(
        ["1girl, zorp and (blen:1.2)", "quix, morv, solo"], steps=3, height=16, width=16, output_type="latent"
    )
    # each prompt names two LoRAs (the shared "1girl" names none): they are the selection on
    # every step, and the rest of the pool is never evaluated (uncond + cond + the four named)
    assert all(
        kept.T.tolist() == [[True, False, True, False], [False, True, False, True]] for kept in result.kept
    )
    assert result.rows == [2 + 4] * 3
    untagged = LoRAtorioDiffusers(
        sd,
        [random_lora(tmp_path / f"u{i}.safetensors", sd, seed=i) for i in range(3)],
        config=LoRAtorioConfig(top_k=2, recenter=1.0),
    )
    # no tags to go by: the first step evaluates the whole pool to rank it
    assert untagged("zorp", steps=1, height=16, width=16, output_type="latent").rows == [2 + 3]


def test_an_interrupt_mid_generation_leaves_the_pipeline_as_it_was(sd, tmp_path):
    paths = [random_lora(tmp_path / f"l{i}.safetensors", sd, seed=i, text_encoder=True) for i in range(2)]
    before = {n: p.detach().clone() for n, p in sd.unet.named_parameters()}
    composer = LoRAtorioDiffusers(sd, paths)

    def interrupt(step, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        composer("a cube", steps=3, height=16, width=16, on_step=interrupt)
    assert all(not m._forward_hooks for m in sd.unet.modules())
    assert all(not m._forward_hooks for m in sd.text_encoder.modules())
    assert all(torch.equal(p, before[n]) for n, p in sd.unet.named_parameters())
    after = LoRAtorioDiffusers(sd, [])("a cube", steps=2, height=16, width=16, output_type="latent")
    fresh = sd(
        "a cube",
        num_inference_steps=2,
        height=16,
        width=16,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images
    assert torch.equal(after.latents, fresh)


def test_a_lora_for_another_architecture_is_refused(sd, tmp_path):
    xl = tiny_sdxl(tmp_path / "xl")
    path = random_lora(tmp_path / "xl_lora.safetensors", xl, seed=0)
    with pytest.raises(LoRAFileError, match="xl_lora.safetensors"):
        LoRAtorioDiffusers(sd, [path])


def test_with_one_lora_the_gated_single_pass_is_the_exact_method(sd, tmp_path):
    # One LoRA always has weight 1, so its gated row is that LoRA at full scale, the very row an
    # exact step evaluates; at lam = 0 the uncond is that LoRA's too: gated steps change nothing.
    path = random_lora(tmp_path / "one.safetensors", sd, seed=3, text_encoder=True)
    exact_config = LoRAtorioConfig(recenter=0.0)
    gated_config = exact_config.replace(exact_every=3, exact_first=1)
    exact = LoRAtorioDiffusers(sd, [path], [0.8], exact_config)
    gated = LoRAtorioDiffusers(sd, [path], [0.8], gated_config)
    kwargs = dict(steps=5, height=16, width=16, output_type="latent", record_weights=True)
    want, got = exact("a cube", **kwargs), gated("a cube", **kwargs)
    torch.testing.assert_close(got.latents, want.latents, atol=1e-4, rtol=1e-4)
    assert got.rows == [6, 2, 2, 6, 2]  # exact steps add the gated cond and uncond rows
    assert [w is not None for w in got.weights] == [True, False, False, True, False]


def test_gated_steps_run_with_several_loras_top_k_and_text_encoder_parts(sd, tmp_path):
    paths = [random_lora(tmp_path / f"l{i}.safetensors", sd, seed=i, text_encoder=i == 0) for i in range(3)]
    config = LoRAtorioConfig(exact_every=2, exact_first=1, top_k=2, reselect_every=2)
    result = LoRAtorioDiffusers(sd, paths, config=config)(
        "a cube", steps=4, height=16, width=24, output_type="latent", num_images_per_prompt=2
    )
    assert torch.isfinite(result.latents).all()
    assert result.rows[1] == 2 and result.rows[3] == 2  # gated: one cond, one uncond row
