"""Reading LoRA files: every supported format, and a clear error for every broken file."""

from __future__ import annotations

import json
import struct

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loratorio_core.lora import LayerUpdate, LoRAFileError, load_lora, save_lora

g = torch.Generator().manual_seed(1)


def rnd(*shape):
    return torch.randn(*shape, generator=g)


def write(tmp_path, tensors, name="lora.safetensors", metadata=None):
    path = tmp_path / name
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return path


def test_kohya_files_round_trip_with_components_alpha_and_locon_mid(tmp_path):
    layers = {
        ("unet", "down_blocks_0_attentions_0_proj_in"): LayerUpdate(
            down=rnd(4, 320, 1, 1), up=rnd(320, 4, 1, 1), alpha=2.0
        ),
        ("unet", "down_blocks_0_resnets_0_conv1"): LayerUpdate(
            down=rnd(4, 320, 1, 1), mid=rnd(4, 4, 3, 3), up=rnd(320, 4, 1, 1), alpha=4.0
        ),
        ("te1", "text_model_encoder_layers_0_self_attn_q_proj"): LayerUpdate(
            down=rnd(4, 768), up=rnd(768, 4), alpha=1.0
        ),
        ("te2", "text_model_encoder_layers_0_mlp_fc1"): LayerUpdate(
            down=rnd(2, 1280), up=rnd(5120, 2), alpha=2.0
        ),
    }
    path = tmp_path / "style.safetensors"
    save_lora(path, layers, {"ss_network_dim": "4"})
    lora = load_lora(path)
    assert lora.name == "style" and lora.metadata == {"ss_network_dim": "4"}
    assert set(lora.layers) == set(layers)
    for key, update in layers.items():
        got = lora.layers[key]
        assert torch.equal(got.down, update.down) and torch.equal(got.up, update.up)
        assert got.alpha == update.alpha and got.multiplier == update.alpha / update.rank
    assert torch.equal(
        lora.layers[("unet", "down_blocks_0_resnets_0_conv1")].mid,
        layers[("unet", "down_blocks_0_resnets_0_conv1")].mid,
    )
    assert set(lora.component("te2")) == {"text_model_encoder_layers_0_mlp_fc1"}


def test_sd1_kohya_text_encoder_prefix_is_the_first_text_encoder(tmp_path):
    path = write(
        tmp_path,
        {
            "lora_te_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight": rnd(2, 8),
            "lora_te_text_model_encoder_layers_0_self_attn_k_proj.lora_up.weight": rnd(8, 2),
        },
    )
    assert list(load_lora(path).layers) == [("te1", "text_model_encoder_layers_0_self_attn_k_proj")]


def test_peft_and_diffusers_spellings_normalise_to_the_same_layer_paths(tmp_path):
    tensors = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": rnd(4, 320),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": rnd(320, 4),
        "unet.mid_block.attentions.0.proj_out.lora.down.weight": rnd(4, 1280),
        "unet.mid_block.attentions.0.proj_out.lora.up.weight": rnd(1280, 4),
        "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.down.weight": rnd(
            4, 1280
        ),
        "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight": rnd(
            1280, 4
        ),
        "text_encoder.text_model.encoder.layers.3.mlp.fc2.lora_A.weight": rnd(4, 3072),
        "text_encoder.text_model.encoder.layers.3.mlp.fc2.lora_B.weight": rnd(768, 4),
        "text_encoder_2.text_model.encoder.layers.0.self_attn.v_proj.lora_A.weight": rnd(4, 1280),
        "text_encoder_2.text_model.encoder.layers.0.self_attn.v_proj.lora_B.weight": rnd(1280, 4),
        "transformer.blocks.0.attn.lora_A.weight": rnd(2, 16),
        "transformer.blocks.0.attn.lora_B.weight": rnd(16, 2),
        "base_model.model.conv_in.lora_A.weight": rnd(2, 4, 3, 3),
        "base_model.model.conv_in.lora_B.weight": rnd(320, 2, 1, 1),
    }
    lora = load_lora(write(tmp_path, tensors))
    assert set(lora.layers) == {
        ("unet", "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"),
        ("unet", "mid_block_attentions_0_proj_out"),
        ("unet", "up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0"),
        ("te1", "text_model_encoder_layers_3_mlp_fc2"),
        ("te2", "text_model_encoder_layers_0_self_attn_v_proj"),
        ("unet", "blocks_0_attn"),
        ("unet", "conv_in"),
    }
    # PEFT files carry no alpha: the update is applied as is (alpha = rank)
    assert lora.layers[("te1", "text_model_encoder_layers_3_mlp_fc2")].multiplier == 1.0


def test_loha_lokr_and_full_diff_become_dense_deltas_with_their_formulas(tmp_path):
    w1a, w1b, w2a, w2b = rnd(6, 2), rnd(2, 5), rnd(6, 2), rnd(2, 5)
    k1, k2a, k2b = rnd(2, 3), rnd(4, 2), rnd(2, 3)
    c1, c2 = rnd(2, 2), rnd(3, 2, 3, 3)
    diff, diff_b = rnd(6, 5), rnd(6)
    tensors = {
        "lora_unet_a.hada_w1_a": w1a,
        "lora_unet_a.hada_w1_b": w1b,
        "lora_unet_a.hada_w2_a": w2a,
        "lora_unet_a.hada_w2_b": w2b,
        "lora_unet_a.alpha": torch.tensor(1.0),
        "lora_unet_b.lokr_w1": k1,
        "lora_unet_b.lokr_w2_a": k2a,
        "lora_unet_b.lokr_w2_b": k2b,
        "lora_unet_b.alpha": torch.tensor(4.0),
        "lora_unet_c.lokr_w1": c1,
        "lora_unet_c.lokr_w2": c2,
        "lora_unet_d.diff": diff,
        "lora_unet_d.diff_b": diff_b,
    }
    layers = load_lora(write(tmp_path, tensors)).component("unet")
    torch.testing.assert_close(layers["a"].dense, (w1a @ w1b) * (w2a @ w2b) * 0.5)
    torch.testing.assert_close(layers["b"].dense, torch.kron(k1, k2a @ k2b) * 2.0)
    torch.testing.assert_close(layers["c"].dense, torch.kron(c1[:, :, None, None], c2))
    assert torch.equal(layers["d"].dense, diff) and torch.equal(layers["d"].dense_bias, diff_b)
    assert all(u.is_dense and u.multiplier == 1.0 for u in layers.values())


@pytest.mark.parametrize(
    "key, kind",
    [
        ("lora_unet_a.dora_scale", "DoRA"),
        ("unet.a.lora_magnitude_vector", "DoRA"),
        ("lora_unet_a.on_input", "IA3"),
        ("lora_unet_a.oft_blocks", "OFT"),
        ("lora_unet_a.a1.weight", "GLoRA"),
    ],
)
def test_unsupported_lycoris_types_are_refused_by_name(tmp_path, key, kind):
    path = write(
        tmp_path,
        {key: rnd(4, 4), "lora_unet_a.lora_down.weight": rnd(2, 4), "lora_unet_a.lora_up.weight": rnd(4, 2)},
    )
    with pytest.raises(LoRAFileError, match=kind) as error:
        load_lora(path)
    assert str(path) in str(error.value)


def test_keys_that_are_no_layer_update_are_reported(tmp_path):
    path = write(
        tmp_path,
        {
            "lora_unet_a.lora_down.weight": rnd(2, 4),
            "lora_unet_a.lora_up.weight": rnd(4, 2),
            "emb_params": rnd(3),
        },
    )
    assert load_lora(path).unknown_keys == ["emb_params"]


# --- broken files: a clear error naming the file and the problem -------------------------------


def valid_file(tmp_path):
    return write(
        tmp_path,
        {
            "lora_unet_layer.lora_down.weight": rnd(2, 8),
            "lora_unet_layer.lora_up.weight": rnd(8, 2),
            "lora_unet_layer.alpha": torch.tensor(2.0),
        },
    )


def with_header(tmp_path, header: dict, body: bytes, name="bad.safetensors"):
    raw = json.dumps(header).encode()
    path = tmp_path / name
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    return path


def expect(path, fragment):
    with pytest.raises(LoRAFileError) as error:
        load_lora(path)
    assert str(path) in str(error.value)
    assert fragment in str(error.value)


def test_truncated_file(tmp_path):
    data = valid_file(tmp_path).read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-10])
    expect(cut, "outside the file")
    cut.write_bytes(data[:20])
    expect(cut, "truncated")
    cut.write_bytes(data[:5])
    expect(cut, "truncated")


def test_header_that_is_not_json(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 6) + b"{nope}")
    expect(path, "not valid JSON")


def test_header_that_lies_about_shapes(tmp_path):
    header = {"lora_unet_a.lora_down.weight": {"dtype": "F32", "shape": [2, 800], "data_offsets": [0, 64]}}
    expect(with_header(tmp_path, header, bytes(64)), "needs 6400 bytes")


def test_header_that_lies_about_offsets(tmp_path):
    header = {"lora_unet_a.lora_down.weight": {"dtype": "F32", "shape": [2, 8], "data_offsets": [1000, 1064]}}
    expect(with_header(tmp_path, header, bytes(64)), "outside the file")
    header = {
        "lora_unet_a.lora_down.weight": {"dtype": "F32", "shape": [2, 8], "data_offsets": [0, 64]},
        "lora_unet_a.lora_up.weight": {"dtype": "F32", "shape": [8, 2], "data_offsets": [32, 96]},
    }
    expect(with_header(tmp_path, header, bytes(96)), "sharing bytes")


def test_oversized_header(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    expect(path, "100 MB limit")


def test_unknown_dtype_and_bad_shape(tmp_path):
    expect(
        with_header(tmp_path, {"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, bytes(16)),
        "unsupported dtype",
    )
    expect(
        with_header(tmp_path, {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4)),
        "invalid shape",
    )


def test_nan_and_inf_weights(tmp_path):
    down = rnd(2, 8)
    down[1, 3] = float("nan")
    expect(
        write(tmp_path, {"lora_unet_a.lora_down.weight": down, "lora_unet_a.lora_up.weight": rnd(8, 2)}),
        "NaN or Inf",
    )
    up = rnd(8, 2)
    up[0, 0] = float("inf")
    expect(
        write(
            tmp_path,
            {"lora_unet_a.lora_down.weight": rnd(2, 8), "lora_unet_a.lora_up.weight": up},
            "inf.safetensors",
        ),
        "NaN or Inf",
    )


def test_up_and_down_ranks_that_disagree(tmp_path):
    expect(
        write(tmp_path, {"lora_unet_a.lora_down.weight": rnd(4, 8), "lora_unet_a.lora_up.weight": rnd(8, 2)}),
        "rank 2 but down has rank 4",
    )


def test_half_a_layer(tmp_path):
    expect(write(tmp_path, {"lora_unet_a.lora_down.weight": rnd(4, 8)}), "no up")


def test_pickle_files_are_never_opened(tmp_path):
    for suffix in (".ckpt", ".pt", ".pth", ".bin"):
        path = tmp_path / f"lora{suffix}"
        torch.save({"x": rnd(2)}, path)
        expect(path, "pickle")
    disguised = tmp_path / "disguised.safetensors"
    torch.save({"x": rnd(2)}, disguised)
    expect(disguised, "pickle/zip")


def test_missing_empty_folder_and_layerless_files(tmp_path):
    expect(tmp_path / "absent.safetensors", "no such file")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    expect(tmp_path / "empty.safetensors", "truncated")
    (tmp_path / "dir.safetensors").mkdir()
    expect(tmp_path / "dir.safetensors", "folder")
    expect(
        write(tmp_path, {"model.diffusion_model.conv.weight": rnd(2, 2)}, "ckpt.safetensors"),
        "holds no LoRA layers",
    )


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6),
    st.one_of(st.none(), st.integers(0, 10**6)),
)
def test_random_byte_mutations_give_a_clear_error_or_a_correct_load(tmp_path, edits, cut):
    data = bytearray(valid_file(tmp_path).read_bytes())
    for position, value in edits:
        data[position % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    path = tmp_path / "mutated.safetensors"
    path.write_bytes(bytes(data))
    try:
        lora = load_lora(path)
    except LoRAFileError as error:
        assert str(path) in str(error)
        return
    # It loaded: the tensors must be what the bytes say (the safetensors library agrees).
    reference = safetensors.torch.load(bytes(data))
    for update in lora.layers.values():
        for tensor in (update.down, update.up):
            assert any(t.shape == tensor.shape and torch.equal(t, tensor) for t in reference.values())
            assert torch.isfinite(tensor).all()
