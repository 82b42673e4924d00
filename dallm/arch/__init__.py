"""Model architectures with random weights, for benchmarks and end-to-end runs at real scale.

`sd15` is Stable Diffusion v1-5's UNet / VAE / CLIP ViT-L/14 text encoder, from the JSON configs beside
this file (copied from the model's published config files), so no download is needed. Throughput and
memory do not depend on the weights' values. Its tokenizer (`write_sd15_tokenizer`) is a CLIP BPE that
matches the real one where dallm depends on it: 49,408 ids with `<|startoftext|>` = 49406 and
`<|endoftext|>` = 49407 (so added placeholder tokens get ids 49408, 49409, ... and the embedding table
keeps its size), sequences of 77, lower-casing, and every word of the paper's prompts
("a realistic painting of a cat in baroque art style like <s1><s2>") as one token, `painting` included
(the single-token initializer word). Other words split into characters, unlike the real tokenizer.

`save_random_base` writes such a model in the diffusers layout (model_index.json, unet/, vae/,
text_encoder/, tokenizer/, scheduler/; safetensors), so it loads through the same `from_pretrained(dir)`
calls as a local copy of SD v1-5 (`scripts/make_random_base.py`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from dallm.manifest import save_pretrained

HERE = Path(__file__).parent
# CLIP ViT-L/14's vocabulary size; the last two ids are <|startoftext|> and <|endoftext|>.
CLIP_VOCAB_SIZE = 49408
# Words that must be single tokens, as in the real CLIP vocabulary (the paper's prompts + common words).
SD15_WORDS = (
    "a an the of in like and with photo realistic painting cat dog baroque art style shape "
    "circle square triangle red green blue gold dark picture portrait oil"
).split()


def _config(name: str) -> dict:
    return json.loads((HERE / f"{name}.json").read_text())


def _bpe_merges(words: list[str]) -> list[tuple[str, str]]:
    """Merges of a byte-pair encoding trained on `words` (each counted once) until each is one symbol.

    Trained as BPE is (most frequent pair first, applied everywhere), so encoding replays the same merges
    in the same order and every word comes out as one token, whatever letters the words share.
    """
    symbols = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in dict.fromkeys(words)}
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in symbols.values()):
        counts: dict[tuple[str, str], int] = {}
        for s in symbols.values():
            for pair in zip(s, s[1:], strict=False):
                counts[pair] = counts.get(pair, 0) + 1
        best = min(counts, key=lambda pair: (-counts[pair], pair))  # ties: alphabetical, deterministic
        merges.append(best)
        for w, s in symbols.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            symbols[w] = out
    return merges


def write_sd15_tokenizer(out_dir: str | Path, words: list[str] | tuple[str, ...] = SD15_WORDS) -> Path:
    """Write `vocab.json` + `merges.txt` (the files of SD v1-5's tokenizer/ folder) of a 49,408-id CLIP BPE.

    Ids: the 256 byte symbols, the same with `</w>`, the merge results that make `words` whole tokens,
    filler entries that no merge can produce up to id 49405, then `<|startoftext|>`, `<|endoftext|>`.
    """
    from dallm.arch.tiny import bytes_to_unicode

    out_dir = Path(out_dir)
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    merges = _bpe_merges(list(words))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    n = len(vocab)
    for i in range(CLIP_VOCAB_SIZE - 2 - n):
        vocab[f"<|unused{i}|>"] = n + i
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return out_dir


def sd15_tokenizer():
    """The SD v1-5-shaped CLIPTokenizer of `write_sd15_tokenizer`."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_sd15_tokenizer(tmp)
        return CLIPTokenizer(f"{tmp}/vocab.json", f"{tmp}/merges.txt", model_max_length=77)


@torch.no_grad()
def random_init_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter in place: matrices/kernels N(0, 1/fan_in), 1-d weights (norms) 1, biases 0.

    One normal_ per tensor, no per-layer init logic: an 860 M-parameter UNet fills in ~10 s on one CPU
    core. The 1/fan_in variance keeps activations O(1), so half-precision runs stay finite.
    """
    g = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dim() > 1:
            p.normal_(0.0, p[0].numel() ** -0.5, generator=g)
        elif name.endswith("weight"):
            p.fill_(1.0)
        else:
            p.zero_()
    return module


def _diffusers_model(cls, config: dict, device, dtype: torch.dtype, seed: int):
    """A diffusers model built on the meta device (no default init), then materialised and filled."""
    with torch.device("meta"):
        model = cls.from_config(config)
    if str(device) == "meta":
        return model
    # The SD UNet and VAE hold no buffers, so to_empty + filling every parameter leaves nothing unset.
    if any(True for _ in model.buffers()):
        raise RuntimeError(f"{cls.__name__} has buffers; random_init_ would leave them uninitialised")
    # nn.Module.to, not diffusers' override: that one warns on every dtype cast.
    return random_init_(torch.nn.Module.to(model.to_empty(device=device), dtype), seed)


def _sd15(device, dtype: torch.dtype, seed: int) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text = {k: v for k, v in _config("sd15_text_encoder").items() if k not in ("architectures", "model_type")}
    with torch.device(device):
        text_encoder = CLIPTextModel(CLIPTextConfig(**text))  # 123 M: its own init is quick enough
    return {
        "tokenizer": sd15_tokenizer(),
        "text_encoder": text_encoder,
        "vae": _diffusers_model(AutoencoderKL, _config("sd15_vae"), device, dtype, seed + 1),
        "unet": _diffusers_model(UNet2DConditionModel, _config("sd15_unet"), device, dtype, seed + 2),
    }


def build_components(
    arch: str, dtype: torch.dtype = torch.float32, seed: int = 0, device: str = "cpu"
) -> dict:
    """Tokenizer, noise scheduler, text encoder, VAE and UNet of `arch` ("sd15" or "tiny"), random weights.

    The dict's keys are `DallmModule.attach_base`'s arguments. Built directly on `device` ("meta": shapes
    only). The noise scheduler is DDPM with the model's published schedule (what training uses).
    """
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    if arch == "sd15":
        parts = _sd15(device, dtype, seed)
        scheduler = DDPMScheduler.from_config(_config("sd15_scheduler"))
    elif arch == "tiny":
        from dallm.arch.tiny import build_tiny_pipeline

        with tempfile.TemporaryDirectory() as tmp:
            pipe = build_tiny_pipeline(tmp, seed=seed)
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        parts = {
            "tokenizer": pipe.tokenizer,
            "text_encoder": pipe.text_encoder,
            "vae": pipe.vae,
            "unet": pipe.unet,
        }
    else:
        raise ValueError(f"--arch must be tiny or sd15, got {arch!r}")
    for name in ("text_encoder", "vae", "unet"):
        # No cast when already in dtype: diffusers warns on every .to(dtype).
        part = parts[name]
        parts[name] = part.to(device) if part.dtype == dtype else part.to(device, dtype)
    return {"noise_scheduler": scheduler, **parts}


def save_random_base(
    arch: str, out_dir: str | Path, dtype: torch.dtype = torch.float32, seed: int = 0
) -> Path:
    """Write a random-weight `arch` model to `out_dir` in the diffusers layout of SD v1-5; return it.

    model_index.json names the same classes as SD v1-5's (PNDMScheduler, CLIPTextModel, CLIPTokenizer,
    AutoencoderKL, UNet2DConditionModel; no safety checker), weights are safetensors in `dtype`, and the
    tokenizer folder holds vocab.json + merges.txt like the published one.
    """
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    out_dir = Path(out_dir)
    if arch == "tiny":
        from dallm.arch.tiny import build_tiny_pipeline

        torch.manual_seed(seed)
        pipe = build_tiny_pipeline(out_dir, seed=seed)
        if dtype != torch.float32:
            save_pretrained(pipe.to(dtype=dtype), out_dir)
        return out_dir
    parts = build_components(arch, dtype=dtype, seed=seed)
    pipe = StableDiffusionPipeline(
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        unet=parts["unet"],
        scheduler=PNDMScheduler.from_config(_config("sd15_scheduler")),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    save_pretrained(pipe, out_dir)
    # The published tokenizer folder is vocab.json + merges.txt; ship those files next to tokenizer.json.
    write_sd15_tokenizer(out_dir / "tokenizer")
    return out_dir


def save_random_inception(path: str | Path, seed: int = 0) -> Path:
    """Write torch-fidelity's Inception-v3 (`inception-v3-compat`) with random weights, in its weights-file
    format (a torch state dict), for `--kid.weights` / `$DALLM_INCEPTION_WEIGHTS` where the real file
    (a download) is absent. Real shape and cost (11 GFLOP per image); the features mean nothing.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None  # keep the default random init instead of the (empty) file below

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        net = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    torch.save(net.state_dict(), path)
    return path
