"""`dallm sample`: look at a trained LoRA the way a diffusers user gets it, beside the base model if asked."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

from dallm.base import SCHEDULERS, make_scheduler
from dallm.export.trained import resolve_lora_dir
from dallm.ranges import Count, Finite, NonNegativeFinite, Resolution


def parse_seeds(spec: str | int | list[int]) -> list[int]:
    """`"0-3,8,10-11"` -> [0, 1, 2, 3, 8, 10, 11]; an int or a list passes through."""
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, list):
        return [int(s) for s in spec]
    seeds: list[int] = []
    for part in str(spec).replace(" ", "").split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise ValueError(f"--seeds: {part!r} is not a seed or a range a-b with a <= b (e.g. 0-7,10)")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        seeds.extend(range(lo, hi + 1))
    return seeds


def load_pipeline(base: str, lora_dir: Path | None, device: str):
    """StableDiffusionPipeline of `base` (dallm.base's loader and dtype rule), with the LoRA (adapter "dallm")
    and its tokens when `lora_dir` is given: `load_lora_weights` + `load_textual_inversion`, exactly what a
    diffusers user runs."""
    from dallm.base import load_base_pipeline

    pipe = load_base_pipeline(base, device=device, flag="--base")
    if lora_dir is not None:
        info = json.loads((lora_dir / "dallm.json").read_text())
        pipe.load_lora_weights(lora_dir, adapter_name="dallm")
        if info.get("sdxl"):  # both encoders' rows (dallm.export.sdxl)
            from dallm.export.sdxl import load_tokens_from_export

            load_tokens_from_export(pipe, lora_dir, info)
            pipe.set_progress_bar_config(disable=True)
            return pipe
        files = [str(lora_dir / f) for f in info.get("token_files", [])]
        if files:
            pipe.load_textual_inversion(files)
        if info.get("trigger") and (lora_dir / info["embedding_file"]).is_file():
            # the run's one-word trigger too, so prompts may say `... toy-v0` as in the other tools
            pipe.load_textual_inversion(str(lora_dir / info["embedding_file"]), token=info["trigger"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def label_grid(rows: list[tuple[str, list]], columns: list[str]):
    """A PIL grid: one labelled row per (label, images), one labelled column per seed.

    A column is as wide as its widest label or its image, whichever is wider (images centred in it), so
    labels never run into each other however small the images are.
    """
    from PIL import Image, ImageDraw

    w, h = rows[0][1][0].size
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = [int(draw.textlength(c)) for c in columns]
    cell = max(w, max(text_w) + 6)  # 6 px apart at least
    left = 8 + max(int(draw.textlength(label)) for label, _ in rows)
    top = 14
    grid = Image.new("RGB", (left + cell * len(columns), top + h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for j, col in enumerate(columns):
        draw.text((left + j * cell + (cell - text_w[j]) // 2, 1), col, fill="black")
    for i, (label, images) in enumerate(rows):
        draw.text((2, top + i * h + h // 2 - 5), label, fill="black")
        for j, im in enumerate(images):
            grid.paste(im, (left + j * cell + (cell - w) // 2, top + i * h))
    return grid


def sample(
    lora: str,
    prompt: list[str] | None = None,
    prompts_file: str | None = None,
    seeds: str = "0-3",
    steps: Count = 25,
    guidance: NonNegativeFinite = 7.5,
    scheduler: str = "dpm++",
    lora_scale: Finite | list[Finite] = 1.0,
    compare: bool = False,
    base: str | None = None,
    out: str = "dallm_samples",
    batch_size: Count = 4,
    resolution: Resolution | None = None,
    device: str | None = None,
) -> int:
    """Sample a trained LoRA: one PNG per image and a labelled grid (`grid.png`) in --out.

    Loads the base model and the LoRA exactly as a diffusers user does (`load_lora_weights` +
    `load_textual_inversion`). Prompts are the run's instance prompt unless given.

    Args:
        lora: a LoRA export dir (with dallm.json) or a run dir (its lora/best, else lora/last).
        prompt: a prompt; repeat the flag for more (`--prompt "a" --prompt "b"`). Default: the instance prompt.
        prompts_file: a text file with one prompt per line (added to --prompt).
        seeds: seeds as ranges and lists, e.g. 0-7 or 0,3,10-12; image (prompt, seed) is the same at every scale.
        steps: sampler steps.
        guidance: classifier-free guidance scale.
        scheduler: dpm++ (DPM-Solver++ multistep, as dallm's KID rounds), ddim, or model (the base model's own).
        lora_scale: LoRA strength, one value or a list for a sweep (e.g. [0, 0.5, 1]); 0 switches the LoRA off
            (the learned tokens stay in the vocabulary).
        compare: also sample the base model without the LoRA and its tokens, same prompts and seeds.
        base: base model (hub id or directory) instead of the one in dallm.json.
        out: output directory.
        batch_size: images per pipeline call.
        resolution: image size; default the run's training resolution, else the model's.
        device: cpu, cuda, ...; default cuda when available (fp16), else cpu (fp32).
    """
    from tqdm.auto import tqdm

    lora_dir = resolve_lora_dir(lora)
    info = json.loads((lora_dir / "dallm.json").read_text())
    prompts = list(prompt or [])
    if prompts_file:
        prompts += [p.strip() for p in Path(prompts_file).read_text().splitlines() if p.strip()]
    prompts = prompts or [info["instance_prompt"]]
    seed_list = parse_seeds(seeds)
    scales = [float(lora_scale)] if isinstance(lora_scale, (int, float)) else [float(s) for s in lora_scale]
    if steps < 1 or batch_size < 1 or not scales:
        raise ValueError("--steps and --batch_size must be >= 1 and --lora_scale non-empty")
    if scheduler not in SCHEDULERS:
        raise ValueError(f"--scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    base = base or str(info["base_model"])
    resolution = resolution or info.get("resolution")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)

    variants = [(f"scale {s:g}", s) for s in scales] + ([("base", None)] if compare else [])
    jobs = [(v, p, seed) for v in variants for p in range(len(prompts)) for seed in seed_list]
    results: dict[tuple, object] = {}
    bar = tqdm(total=len(jobs), desc="dallm sample", unit="img", file=sys.stderr)
    for use_lora in (True, False):
        todo = [(v, p, s) for v, p, s in jobs if (v[1] is not None) == use_lora]
        if not todo:
            continue
        pipe = load_pipeline(base, lora_dir if use_lora else None, device)
        sched = make_scheduler(scheduler, pipe.scheduler.config)
        if sched is not None:
            pipe.scheduler = sched
        for (label, scale), p in {(v, p): None for v, p, _ in todo}:
            if use_lora:
                pipe.set_adapters(["dallm"], adapter_weights=[scale])
            mine = [s for v, q, s in todo if v == (label, scale) and q == p]
            for i in range(0, len(mine), batch_size):
                batch = mine[i : i + batch_size]
                images = pipe(
                    prompt=[prompts[p]] * len(batch),
                    generator=[torch.Generator(device=device).manual_seed(s) for s in batch],
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    height=resolution,
                    width=resolution,
                ).images
                for s, im in zip(batch, images, strict=True):
                    results[((label, scale), p, s)] = im
                    name = "base" if scale is None else f"scale{scale:g}"
                    im.save(out_dir / f"p{p}_{name}_seed{s}.png")
                bar.update(len(batch))
        del pipe
    bar.close()

    rows = [(f"p{p} {label}", [results[((label, scale), p, s)] for s in seed_list])
            for p in range(len(prompts)) for label, scale in variants]  # fmt: skip
    label_grid(rows, [f"seed {s}" for s in seed_list]).save(out_dir / "grid.png")
    index = {"lora": str(lora_dir), "base": base, "prompts": prompts, "seeds": seed_list, "steps": steps,
             "guidance": guidance, "scheduler": scheduler, "lora_scale": scales, "compare": compare,
             "step": info.get("step", info.get("global_step"))}  # fmt: skip
    (out_dir / "samples.json").write_text(json.dumps(index, indent=2) + "\n")
    print(f"dallm sample: {len(jobs)} images of {lora_dir} (step {index['step']}) -> {out_dir / 'grid.png'}")
    return 0


def sample_main(argv: list[str]) -> int:
    """`dallm sample --lora RUN_DIR|LORA_DIR [...]`: errors on one line, exit status 2."""
    from jsonargparse import CLI

    from dallm.errors import PARSER_KWARGS

    # `--prompt a --prompt b` appends (jsonargparse's list syntax is `--prompt+ a`); a bare `--compare` is true.
    argv = [
        "--prompt+" if a == "--prompt" else "--prompt+=" + a[9:] if a.startswith("--prompt=") else a
        for a in argv
    ]
    argv = [x for i, a in enumerate(argv) for x in (
        [a, "true"] if a == "--compare" and (i + 1 == len(argv) or argv[i + 1].startswith("--")) else [a])]  # fmt: skip
    # Errors reach cli.main's boundary: one line, exit 2.
    return CLI(sample, args=argv, as_positional=False, prog="dallm sample", **PARSER_KWARGS)
