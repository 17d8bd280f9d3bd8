import hashlib
import os

import pytest
import torch
from safetensors.torch import save_file

from comfyui_mixofshow.mixofshow_core import sd15
from comfyui_mixofshow.mixofshow_core.edlora_format import (PTH_HASH_KEY, EDLoRA, EDLoRAFormatError, LoRALayer,
                                                            check_pth_replaceable, load_edlora, save_edlora,
                                                            save_edlora_original, save_edlora_with_pth,
                                                            to_original_dict)
from comfyui_mixofshow.mixofshow_core.safe_io import read_safetensors

BLOCK = sd15.CROSS_ATTN_BLOCKS[0]


def original_dict(key_style="main", wrapped=True, rank=4, seed=0):
    """An ED-LoRA in the original Mix-of-Show .pth layout, built by hand (SD1.5 shapes)."""
    g = torch.Generator().manual_seed(seed)
    down, up = (".lora_down.weight", ".lora_up.weight") if key_style == "main" else ("_lora.down.weight", "_lora.up.weight")
    unet, text = {}, {}
    for lin, (out_dim, in_dim) in {"attn1.to_q": (320, 320), "attn2.to_k": (320, 768),
                                   "attn2.to_out.0": (320, 320)}.items():
        path = f"{BLOCK}.transformer_blocks.0.{lin}"
        unet[path + down] = torch.randn(rank, in_dim, generator=g)
        unet[path + up] = torch.randn(out_dim, rank, generator=g)
    unet[f"{BLOCK}.proj_in" + down] = torch.randn(rank, 320, 1, 1, generator=g)
    unet[f"{BLOCK}.proj_in" + up] = torch.randn(320, rank, 1, 1, generator=g)
    for lin in ("q_proj", "v_proj"):
        path = f"text_model.encoder.layers.3.self_attn.{lin}"
        text[path + down] = torch.randn(rank, 768, generator=g).requires_grad_()  # as the original saves them
        text[path + up] = torch.randn(768, rank, generator=g)
    params = {"new_concept_embedding": {"<potter1>": torch.randn(16, 768, generator=g),
                                        "<potter2>": torch.randn(16, 768, generator=g)},
              "text_encoder": text, "unet": unet}
    return {"params": params} if wrapped else params


def assert_same_nested(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            assert_same_nested(a[k], b[k])
        else:
            assert torch.equal(a[k].detach(), b[k].detach()), k


@pytest.mark.parametrize("key_style", ["main", "research"])
@pytest.mark.parametrize("wrapped", [True, False])
def test_original_pth_round_trips_through_safetensors_losslessly(tmp_path, key_style, wrapped):
    original = original_dict(key_style, wrapped)
    torch.save(original, tmp_path / "concept.pth")
    edlora = load_edlora(str(tmp_path / "concept.pth"))
    save_edlora(edlora, str(tmp_path / "concept.safetensors"))
    again = load_edlora(str(tmp_path / "concept.safetensors"))
    save_edlora_original(again, str(tmp_path / "back.pth"))
    assert_same_nested(original, torch.load(tmp_path / "back.pth", weights_only=True))
    assert again.words == ["<potter1>", "<potter2>"]
    assert again.rank == 4 and again.num_layers == 16 and again.text_dim == 768


def test_layers_read_from_the_original_layout():
    params = original_dict()["params"]
    edlora = load_edlora_from(params)
    q = edlora.unet[f"{BLOCK}.transformer_blocks.0.attn1.to_q"]
    assert torch.equal(q.down, params["unet"][f"{BLOCK}.transformer_blocks.0.attn1.to_q.lora_down.weight"])
    assert set(edlora.text_encoder) == {"text_model.encoder.layers.3.self_attn.q_proj",
                                        "text_model.encoder.layers.3.self_attn.v_proj"}
    assert len(edlora.unet) == 4


def load_edlora_from(obj, tmp="/tmp/mixofshow-format-test.pth"):
    torch.save(obj, tmp)
    return load_edlora(tmp)


def test_delta_is_alpha_up_down_without_rank_division():
    g = torch.Generator().manual_seed(1)
    down, up = torch.randn(4, 10, generator=g), torch.randn(6, 4, generator=g)
    expected = 0.7 * sum(torch.outer(up[:, i], down[i]) for i in range(4))
    assert torch.allclose(LoRALayer(down, up).delta(0.7), expected, atol=1e-6)


def test_conv_1x1_delta_has_conv_shape():
    g = torch.Generator().manual_seed(2)
    down, up = torch.randn(4, 8, 1, 1, generator=g), torch.randn(5, 4, 1, 1, generator=g)
    delta = LoRALayer(down, up).delta(2.0)
    assert delta.shape == (5, 8, 1, 1)
    assert torch.allclose(delta[:, :, 0, 0], 2.0 * up[:, :, 0, 0] @ down[:, :, 0, 0], atol=1e-6)


def test_safetensors_uses_kohya_keys_with_alpha_equal_rank(tmp_path):
    edlora = load_edlora_from(original_dict())
    save_edlora(edlora, str(tmp_path / "c.safetensors"))
    from safetensors import safe_open
    with safe_open(str(tmp_path / "c.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        alpha = f.get_tensor("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha")
    assert "lora_te_text_model_encoder_layers_3_self_attn_q_proj.lora_up.weight" in keys
    assert "edlora_embedding.<potter1>" in keys
    assert float(alpha) == 4.0
    assert meta["mixofshow.format"] == "edlora" and meta["mixofshow.base_family"] == "sd15"
    assert meta["mixofshow.concept_words"] == '["<potter1>", "<potter2>"]'


def test_kohya_alpha_scales_the_delta(tmp_path):
    edlora = load_edlora_from(original_dict())
    save_edlora(edlora, str(tmp_path / "c.safetensors"))
    from safetensors.torch import load_file
    from safetensors import safe_open
    tensors = load_file(str(tmp_path / "c.safetensors"))
    with safe_open(str(tmp_path / "c.safetensors"), "pt") as f:
        meta = f.metadata()
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors[key + ".alpha"] = torch.tensor(2.0)  # kohya scale alpha/rank = 0.5
    save_file(tensors, str(tmp_path / "half.safetensors"), metadata=meta)
    half = load_edlora(str(tmp_path / "half.safetensors"))
    path = f"{BLOCK}.transformer_blocks.0.attn1.to_q"
    assert torch.allclose(half.unet[path].delta(1.0), 0.5 * edlora.unet[path].delta(1.0))


def test_atomic_save_leaves_no_partial_file(tmp_path):
    edlora = load_edlora_from(original_dict())
    broken = EDLoRA(edlora.embeddings, {"bogus.layer": next(iter(edlora.unet.values()))}, {}, "broken")
    with pytest.raises(EDLoRAFormatError):
        save_edlora(broken, str(tmp_path / "x.safetensors"))
    assert os.listdir(tmp_path) == []


class Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/mixofshow-pwned",))


def write(tmp_path, obj, name="bad.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return str(path)


def malformed_cases(tmp_path):
    good = original_dict()
    cases = {}
    data = open(write(tmp_path, good, "good.pth"), "rb").read()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    cases["truncated.pth"] = (str(tmp_path / "truncated.pth"), "not a plain tensor checkpoint")
    edlora = load_edlora(str(tmp_path / "good.pth"))
    save_edlora(edlora, str(tmp_path / "good.safetensors"))
    st = open(tmp_path / "good.safetensors", "rb").read()
    (tmp_path / "truncated.safetensors").write_bytes(st[: len(st) // 2])
    cases["truncated.safetensors"] = (str(tmp_path / "truncated.safetensors"), "not a readable .safetensors")

    def variant(name, mutate, message):
        obj = original_dict()
        mutate(obj["params"])
        cases[name] = (write(tmp_path, obj, name), message)

    variant("wide.pth", lambda p: p["new_concept_embedding"].update({"<potter1>": torch.zeros(16, 1024)}),
            "expected [16, 768]")
    variant("rows.pth", lambda p: p["new_concept_embedding"].update({"<potter1>": torch.zeros(8, 768)}),
            "expected [16, 768]")
    variant("unknown_key.pth", lambda p: p["unet"].update({"down_blocks.0.resnets.0.conv1.lora_down.weight": torch.zeros(4, 3)}),
            "unknown unet LoRA key 'down_blocks.0.resnets.0.conv1'")
    variant("odd_key.pth", lambda p: p["unet"].update({"something.else": torch.zeros(1)}), "unknown unet key")
    variant("section.pth", lambda p: p.update({"optimizer": {}}), "unknown sections ['optimizer']")
    variant("string.pth", lambda p: p["unet"].update({"x.lora_down.weight": "rm -rf /"}), "holds a str, not a tensor")
    variant("half.pth", lambda p: p["unet"].pop(f"{BLOCK}.transformer_blocks.0.attn1.to_q.lora_up.weight"),
            "has only one of lora_down/lora_up")
    variant("rank.pth", lambda p: p["unet"].update({f"{BLOCK}.transformer_blocks.0.attn1.to_q.lora_up.weight": torch.zeros(320, 3)}),
            "rank mismatch")
    variant("mixed.pth", lambda p: p["unet"].update({f"{BLOCK}.transformer_blocks.0.attn1.to_v_lora.down.weight": torch.zeros(4, 320),
                                                     f"{BLOCK}.transformer_blocks.0.attn1.to_v_lora.up.weight": torch.zeros(320, 4)}),
            "mixes")
    variant("empty.pth", lambda p: p.update({"new_concept_embedding": {}}), "no concept embeddings")
    variant("nan.pth", lambda p: p["new_concept_embedding"]["<potter2>"].__setitem__((0, 0), float("nan")), "NaN")
    variant("word.pth", lambda p: p.update({"new_concept_embedding": {"potter": torch.zeros(16, 768)}}), "must look like <name>")
    variant("newline_word.pth", lambda p: p.update({"new_concept_embedding": {"<potter>\n": torch.zeros(16, 768)}}),
            "must look like <name>")
    variant("rank0.pth", lambda p: p["unet"].update({f"{BLOCK}.transformer_blocks.0.attn1.to_q.lora_down.weight": torch.zeros(0, 320),
                                                     f"{BLOCK}.transformer_blocks.0.attn1.to_q.lora_up.weight": torch.zeros(320, 0)}),
            "rank 0")
    alpha_key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"
    for name, alpha, message in (("alpha_nan.safetensors", torch.tensor(float("nan")), ".alpha nan"),
                                 ("alpha_huge.safetensors", torch.tensor(1e30), ".alpha 1e+30"),
                                 ("alpha_negative.safetensors", torch.tensor(-4.0), "0 < alpha/rank <= 100"),
                                 ("alpha_vector.safetensors", torch.ones(4), ".alpha must be one number, got shape [4]")):
        tensors, meta = read_safetensors(str(tmp_path / "good.safetensors"))
        tensors[alpha_key] = alpha
        save_file(tensors, str(tmp_path / name), metadata=meta)
        cases[name] = (str(tmp_path / name), message)
    tensors, meta = read_safetensors(str(tmp_path / "good.safetensors"))
    down_key = alpha_key.replace(".alpha", ".lora_down.weight")
    tensors[down_key], tensors[down_key.replace("down", "up")] = torch.zeros(0, 320), torch.zeros(320, 0)
    save_file(tensors, str(tmp_path / "rank0.safetensors"), metadata=meta)
    cases["rank0.safetensors"] = (str(tmp_path / "rank0.safetensors"), "rank 0")
    cases["code.pth"] = (write(tmp_path, {"params": Payload()}, "code.pth"), "not a plain tensor checkpoint")
    cases["list.pth"] = (write(tmp_path, [torch.zeros(1)], "list.pth"), "expected a dict of tensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    cases["plain.safetensors"] = (str(tmp_path / "plain.safetensors"), "not a Mix-of-Show ED-LoRA")
    tensors = {"edlora_embedding.<a>": torch.zeros(16, 768)}
    for name, meta, message in (("family.safetensors", {"mixofshow.base_family": "sdxl"}, "family 'sdxl'"),
                                ("version.safetensors", {"mixofshow.format_version": "9"}, "format version 9"),
                                ("words.safetensors", {"mixofshow.concept_words": "[1"}, "not a JSON list")):
        full = {"mixofshow.format": "edlora", "mixofshow.format_version": "1", "mixofshow.base_family": "sd15",
                "mixofshow.concept_words": '["<a>"]', **meta}
        save_file(tensors, str(tmp_path / name), metadata=full)
        cases[name] = (str(tmp_path / name), message)
    return cases


def test_every_malformed_file_gives_one_clear_error_naming_the_file(tmp_path):
    for name, (path, message) in malformed_cases(tmp_path).items():
        with pytest.raises(EDLoRAFormatError) as info:
            load_edlora(path)
        assert str(info.value).startswith(name + ":"), str(info.value)
        assert message in str(info.value), (name, str(info.value))
    assert not os.path.exists("/tmp/mixofshow-pwned"), "loading a pickle executed its payload"


def test_pth_copy_is_written_with_its_hash_and_replaces_only_its_own_file(tmp_path):
    edlora = load_edlora_from(original_dict())
    path, pth = str(tmp_path / "c.safetensors"), str(tmp_path / "c.pth")
    save_edlora_with_pth(edlora, path, pth)
    assert_same_nested(torch.load(pth, weights_only=True), to_original_dict(edlora))
    assert read_safetensors(path)[1][PTH_HASH_KEY] == hashlib.sha256(open(pth, "rb").read()).hexdigest()
    save_edlora_with_pth(edlora.renamed({"<potter1>": "<harry1>"}), path, pth)  # its own copy: replaced
    assert list(torch.load(pth, weights_only=True)["params"]["new_concept_embedding"])[0] == "<harry1>"
    torch.save({"mine": torch.ones(1)}, pth)  # a user's file of the same name
    mine = open(pth, "rb").read()
    with pytest.raises(FileExistsError, match="c.pth already exists and was not written together with c.safetensors"):
        save_edlora_with_pth(edlora, path, pth)
    os.remove(path)  # without the .safetensors nothing vouches for the .pth either
    with pytest.raises(FileExistsError, match="c.pth already exists"):
        check_pth_replaceable(path, pth)
    assert open(pth, "rb").read() == mine and not os.path.exists(path)


def test_missing_file():
    with pytest.raises(EDLoRAFormatError, match="nope.pth: file not found"):
        load_edlora("/nonexistent/nope.pth")


def test_to_original_dict_folds_kohya_scale_into_up():
    layer = LoRALayer(torch.ones(2, 3), torch.ones(4, 2), scale=0.25)
    edlora = EDLoRA({"<a>": torch.zeros(16, 768)}, {f"{BLOCK}.transformer_blocks.0.attn1.to_q": layer}, {}, "x")
    params = to_original_dict(edlora)["params"]["unet"]
    up = params[f"{BLOCK}.transformer_blocks.0.attn1.to_q.lora_up.weight"]
    down = params[f"{BLOCK}.transformer_blocks.0.attn1.to_q.lora_down.weight"]
    assert torch.allclose(up @ down, layer.delta(1.0))

