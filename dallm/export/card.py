"""The model card of an export: what the LoRA is, its trigger word, its KID curve, where each tool wants which file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dallm.export.trigger import tool_prompts


def plot_kid_curve(history: list[dict], step: int, path: Path) -> bool:
    """kid/val (and kid/train) against steps, error bars where the round has a std; the exported step marked."""
    rows = [h for h in history if "kid/val" in h]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")  # files only, whatever display the machine has
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for name in ("val", "train"):
        pts = [h for h in rows if f"kid/{name}" in h]
        err = [h.get(f"kid/{name}_se", h.get(f"kid/{name}_std", 0.0)) for h in pts]
        ax.errorbar([h["step"] for h in pts], [h[f"kid/{name}"] for h in pts], yerr=err, marker="o", ms=3,
                    capsize=2, label=f"kid/{name}")  # fmt: skip
    for key, style in (("kid/reference", ":"), ("kid/val_floor", "--")):
        ref = next((h[key] for h in history if key in h), None)
        if ref is not None:
            ax.axhline(ref, color="gray", linestyle=style, label=key)
    ax.axvline(step, color="red", alpha=0.5, label=f"exported step {step}")
    ax.set_xlabel("step")
    ax.set_ylabel("KID (lower is closer to the teacher)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return True


def usage_rows(info: dict) -> list[tuple[str, str, str]]:
    """(tool, which file goes where, prompt) for each tool the export serves, from its `dallm.json` info."""
    prompts = tool_prompts(info)
    emb, kohya, a1111 = info.get("embedding_file"), info.get("kohya_file"), info.get("a1111_file")
    rows = []
    if info.get("diffusers_file"):
        rows.append(("diffusers", "this directory (Python below)", prompts["diffusers"]))
    if kohya:
        files = [f"`{kohya}` into `models/Lora`"] + ([f"`{emb}` into `embeddings`"] if emb else [])
        rows.append(("AUTOMATIC1111", ", ".join(files), prompts["a1111"]))
        rows.append(("Forge", ", ".join(files), prompts["forge"]))
        rows.append(
            ("ComfyUI", f"`{kohya}` into `models/loras` (a LoraLoader node)"
             + (f", `{emb}` into `models/embeddings`" if emb else ""), prompts["comfyui"])
        )  # fmt: skip
        rows.append(
            ("kohya sd-scripts", f"`gen_img.py --network_module networks.lora --network_weights {kohya}`"
             + (f" `--textual_inversion_embeddings {emb}`" if emb else ""), prompts["kohya"])
        )  # fmt: skip
    if a1111:
        rows.append(
            ("AUTOMATIC1111, one file", f"`{a1111}` into `models/Lora` (the embedding is bundled inside; "
             "Forge does not read the bundle, ComfyUI warns about it)", prompts["a1111 (one file)"])
        )  # fmt: skip
    return rows


def write_model_card(out_dir: Path, info: dict, run: dict, history: list[dict], samples_png) -> Path:
    """`README.md`: what the LoRA is, its trigger word, its KID, and for each tool where the files go and
    what to type. `samples_png` is the step's sample grid (copied as `samples.png`), if any."""
    step = info["step"]
    toks, word = info["placeholder_tokens"], info.get("trigger")
    has_curve = plot_kid_curve(history, step, out_dir / "kid_curve.png")
    has_grid = samples_png is not None and Path(samples_png).is_file()
    if has_grid and Path(samples_png).resolve() != (out_dir / "samples.png").resolve():
        shutil.copyfile(samples_png, out_dir / "samples.png")
    kid = (
        f"kid/val {info['kid/val']:.4g}"
        + (f" ± {info['kid/val_se']:.2g} (s.e.)" if "kid/val_se" in info else "")
        if "kid/val" in info
        else "no KID round at this step"
    )
    lines = [
        f"# {run['name']} — step {step}",
        "",
        f"A LoRA (rank {info['rank']}, alpha {info['alpha']}{', DoRA' if info.get('use_dora') else ''}) with "
        f"{len(toks)} learned token(s) for `{info['base_model']}`, trained by dallm "
        "(LoRA + pivotal tuning + prior preservation).",
        "",
        (f"- **Trigger word**: `{word}` — the file `{info['embedding_file']}` holds the learned tokens "
         f"{' '.join(f'`{t}`' for t in toks)} as one {len(toks)}-vector embedding, so `{word}` in a prompt "
         f"stands where the run wrote `{''.join(toks)}`" if word else "- **Trigger word**: none (no learned tokens)"),
        f"- **Trained on**: `{info['instance_prompt']}`",
        f"- **Settings**: step {step}"
        + (f" of {run['max_steps']}" if run.get("max_steps") else "")
        + f", {run.get('num_train_images', '?')} teacher images, {run.get('num_reg_images', 0)} class images, "
        f"resolution {run.get('resolution', '?')}, lr {run.get('learning_rate', '?')}, "
        f"target modules {', '.join(info['target_modules'])}"
        + (", text encoder trained" if info["train_text_encoder"] else ""),
        f"- **KID at this step**: {kid}",
        "",
    ]  # fmt: skip
    if has_curve:
        lines += ["![KID while training](kid_curve.png)", ""]
    if has_grid:
        lines += ["Samples at this step (KID round's fixed seeds; second row: the class prompt):", "",
                  "![samples](samples.png)", ""]  # fmt: skip
    lines += ["## Use it", "", "| tool | files | prompt |", "|---|---|---|"]
    lines += [f"| {tool} | {files} | `{prompt}` |" for tool, files, prompt in usage_rows(info)]
    lines += [
        "",
        "Checked by running (dallm's tests): diffusers loads the LoRA and the embedding and reproduces the "
        "run's own sample. Not run here: AUTOMATIC1111, Forge, ComfyUI and kohya's scripts; for them the file "
        'layout and the prompts follow their loading code as read (see dallm\'s README, "Use the result").',
        "",
        "## diffusers",
        "",
    ]
    if info.get("sdxl"):  # both encoders' rows (dallm.export.sdxl)
        from dallm.export.sdxl import card_lines

        lines += card_lines(info, tool_prompts(info)["diffusers"])
        return _write(out_dir, lines)
    lines += [
        "```python",
        "from diffusers import StableDiffusionPipeline",
        "",
        f'pipe = StableDiffusionPipeline.from_pretrained("{info["base_model"]}")',
        'pipe.load_lora_weights("THIS_DIR")',
    ]
    if word:
        lines += [f'pipe.load_textual_inversion("THIS_DIR/{info["embedding_file"]}", token="{word}")']
    lines += [f'image = pipe("{tool_prompts(info)["diffusers"]}").images[0]', "```", ""]
    if info.get("token_files"):
        lines += [
            "Or with one file per token and the prompt as trained: `pipe.load_textual_inversion(["
            + ", ".join(f'"THIS_DIR/{f}"' for f in info["token_files"])
            + f'])`, then `pipe("{info["instance_prompt"]}")`.',
            "",
        ]
    return _write(out_dir, lines)


def _write(out_dir: Path, lines: list[str]) -> Path:
    lines = [*lines, "Or look at it with dallm: `python -m dallm sample --lora THIS_DIR --compare`.", ""]
    path = out_dir / "README.md"
    path.write_text("\n".join(lines))
    return path


def trigger_summary(lora_dir: Path) -> str | None:
    """The end-of-fit summary's lines on the trigger word: the word, and what to type in A1111/Forge/ComfyUI."""
    path = Path(lora_dir) / "dallm.json"
    info = json.loads(path.read_text()) if path.is_file() else {}
    if not info.get("trigger"):
        return None
    prompts = tool_prompts(info)
    lines = [
        f"  trigger word: {info['trigger']} (the file {info['embedding_file']}; which file goes where in each "
        f"tool: {Path(lora_dir) / 'README.md'})"
    ]
    lines += [f"    A1111/Forge: {prompts['a1111']}"] if "a1111" in prompts else []
    lines += (
        [f"    A1111: {prompts['a1111 (one file)']}"]
        if "a1111" not in prompts and "a1111 (one file)" in prompts
        else []
    )
    lines += [f"    ComfyUI: {prompts['comfyui']}"] if "comfyui" in prompts else []
    lines += [f"    diffusers, kohya: {prompts['diffusers']}"]
    return "\n".join(lines)
