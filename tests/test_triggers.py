"""One trigger word for every tool: the files' key layout against each tool's loading conventions, the
trigger word and prompt, and A1111's way of finding an embedding in a prompt.

A1111, Forge, ComfyUI and kohya's scripts are not installed here. The conventions below are the rules their
loaders apply, as read in their code (restated, not copied):
- A1111 `modules/textual_inversion/textual_inversion.py` and Forge
  `backend/text_processing/textual_inversion.py` (`create_embedding_from_data`): a .safetensors embedding is
  a flat dict; it is taken when it holds exactly one tensor (1-D becomes one row) or both `clip_g` and
  `clip_l`; its name is the file name; the rows' width must be the text encoder's (768 for SD1).
- A1111 `extensions-builtin/Lora/networks.py`: `bundle_emb.<name>.string_to_param.<k>` keys become an
  embedding `<name>`, split at the first dots.
- ComfyUI `comfy/sd1_clip.py` (`load_embed`): `embedding:<name>` reads `<name>.safetensors`; the
  `clip_l` tensor if there is one, else the first; each row is one token. `comfy/lora.py` (`load_lora`):
  every key not read as `<module>.alpha`, `.lora_up.weight` or `.lora_down.weight` is warned about as
  "lora key not loaded"; Forge's copy of it lists them as "unmatched keys".
- kohya `gen_img.py --textual_inversion_embeddings`: the first tensor (SD1); `size()[0]` vectors, tokens
  `<name>`, `<name>1`, ...; `networks/lora.py` reads `lora_down`/`alpha` keys per module.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from safetensors.torch import load_file
from test_export import PROMPT, RUN, trained_module

from dallm.export.formats import run_name, write_trained
from dallm.export.trained import from_module
from dallm.export.trigger import check_trigger_name, safe_name, tool_prompts, trigger_prompt

TRIGGER = "a realistic painting of a cat in baroque art style like tiny-v0"
KOHYA_KEY = re.compile(
    r"(lora_unet_\w+|lora_te_text_model_encoder_layers_\d+_\w+)\.(alpha|lora_down\.weight|lora_up\.weight)"
)


def a1111_forge_embedding(state: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The rows A1111/Forge take from a .safetensors embedding (None: refused)."""
    if "clip_g" in state and "clip_l" in state:
        return None  # an SDXL embedding: 768 + 1280 wide, skipped by an SD1 model
    if len(state) != 1:
        return None  # "embedding file has multiple terms in it"
    (rows,) = state.values()
    return rows.unsqueeze(0) if rows.dim() == 1 else rows


def comfyui_embedding(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return state["clip_l"] if "clip_l" in state else next(iter(state.values()))


def test_files_follow_each_tools_conventions_at_sd15_width(tiny_model_dir, tmp_path):
    # SD v1-5's text encoder is 768 wide: the tiny model's LoRA with 768-wide token rows
    g = torch.Generator().manual_seed(0)
    trained = from_module(trained_module(tiny_model_dir, train_text_encoder=True))
    rows = torch.randn(2, 768, generator=g)
    trained = dataclasses.replace(trained, embeddings={"<s1>": rows[0], "<s2>": rows[1]})
    out = write_trained(trained, tmp_path, 5, ["diffusers", "kohya", "a1111"], RUN)

    # per-token files for diffusers: {token: (1, 768)}, one vector each (kohya reads rows, not numbers)
    for token, i in (("<s1>", 0), ("<s2>", 1)):
        state = load_file(out / f"{token[1:-1]}.safetensors")
        assert list(state) == [token] and state[token].shape == (1, 768)
        assert torch.equal(state[token][0], rows[i])
    # the run's embedding: one tensor (2, 768), the tokens in order, named after the run
    state = load_file(out / "tiny-v0.safetensors")
    assert list(state) == ["emb_params"] and state["emb_params"].shape == (2, 768)
    assert torch.equal(a1111_forge_embedding(state), rows)  # A1111 and Forge: 2 vectors named tiny-v0
    assert torch.equal(comfyui_embedding(state), rows)  # ComfyUI: embedding:tiny-v0 gives 2 tokens
    assert next(iter(state.values())).size()[0] == 2  # kohya gen_img: tokens tiny-v0, tiny-v01
    # the kohya file: every key read by ComfyUI/Forge/A1111/kohya as a LoRA module's, all three per module
    kohya = load_file(out / "tiny-v0-lora.safetensors")
    modules = {}
    for key in kohya:
        m = KOHYA_KEY.fullmatch(key)
        assert m, key  # e.g. a bundled token: "lora key not loaded" in ComfyUI, unmatched in Forge
        modules.setdefault(m.group(1), set()).add(m.group(2))
    assert set(map(frozenset, modules.values())) == {
        frozenset({"alpha", "lora_down.weight", "lora_up.weight"})
    }
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in kohya)
    # the a1111 file: the same plus the embedding bundled under the run's name
    a1111 = load_file(out / "tiny-v0-a1111.safetensors")
    bundle = {k: v for k, v in a1111.items() if k.startswith("bundle_emb.")}
    assert (
        list(bundle) == ["bundle_emb.tiny-v0.string_to_param.*"]
        and a1111.keys() - bundle.keys() == kohya.keys()
    )
    _, _, rest = next(iter(bundle)).partition(".")
    assert rest.split(".", 1) == ["tiny-v0", "string_to_param.*"]  # A1111's name for it
    assert torch.equal(bundle["bundle_emb.tiny-v0.string_to_param.*"], rows)

    info = json.loads((out / "dallm.json").read_text())
    prompts = tool_prompts(info)
    assert prompts["a1111"] == prompts["forge"] == f"<lora:tiny-v0-lora:1> {TRIGGER}"
    assert prompts["kohya"] == prompts["diffusers"] == TRIGGER
    assert prompts["comfyui"].split(" ")[-1] == "embedding:tiny-v0"  # ComfyUI splits words at spaces
    assert prompts["a1111 (one file)"] == f"<lora:tiny-v0-a1111:1> {TRIGGER}"


def test_a1111_finds_the_trigger_word_where_a_glued_first_token_is_lost(tiny_model_dir):
    """A1111 and Forge find an embedding where the prompt's token ids contain the ids of its name."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_model_dir, subfolder="tokenizer")

    def finds(prompt: str, name: str) -> bool:
        ids, sub = tok(prompt).input_ids, tok(name, add_special_tokens=False).input_ids
        return any(ids[i : i + len(sub)] == sub for i in range(len(ids)))

    # "<s1><s2>" reads "<" "s" "1" "><" "s" "2" ">": the second token is found, the first is not
    assert finds(PROMPT, "<s2>") and not finds(PROMPT, "<s1>")
    trigger = trigger_prompt(PROMPT, ["<s1>", "<s2>"], "tiny-v0")
    assert trigger == TRIGGER and finds(trigger, "tiny-v0") and not finds(PROMPT, "tiny-v0")
    assert finds("tiny-v0, oil on canvas", "tiny-v0") and finds("(tiny-v0:1.2) cat", "tiny-v0")


def test_trigger_prompt_and_name_rules(tmp_path):
    toks = ["<s1>", "<s2>"]
    assert trigger_prompt("a cat <s1> <s2>, oil", toks, "x-v0") == "a cat x-v0, oil"
    assert trigger_prompt("a cat in style<s1><s2>art", toks, "x-v0") == "a cat in style x-v0 art"
    assert trigger_prompt("(<s1><s2>:1.2) cat", toks, "embedding:x-v0") == "(embedding:x-v0:1.2) cat"
    # tokens apart: the embedding's rows are the tokens in order, so the word stands for them together
    assert trigger_prompt("a <s1> cat <s2>", toks, "x-v0") == "a cat x-v0"
    assert trigger_prompt("a cat", [], "x-v0") == "a cat"
    for ok in ("toy-v0", "cats_2", "sd15-baroque"):
        assert check_trigger_name(ok) == ok
    for bad in ("baroque", "a.b-1", "a b1", "", "<x1>", "-x1", "x1:2"):
        with pytest.raises(ValueError, match="--name"):
            check_trigger_name(bad)
    assert safe_name("sd15 cats") == "sd15-cats" and safe_name("cats") == "cats-v0"
    assert run_name(tmp_path / "sd15 baroque" / "version_3") == "sd15-baroque-v3"
