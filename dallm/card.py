"""The model card of an export: what the LoRA is, its trigger words, its KID curve, how each front-end loads it."""

from __future__ import annotations

import shutil
from pathlib import Path


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


def write_model_card(out_dir: Path, info: dict, run: dict, history: list[dict], samples_dir) -> Path:
    """`README.md`: what the LoRA is, its trigger words, its KID, and how to load it in each front-end."""
    step = info["step"]
    toks = info["placeholder_tokens"]
    has_curve = plot_kid_curve(history, step, out_dir / "kid_curve.png")
    grid = Path(samples_dir) / f"step={step:06d}.png" if samples_dir else None
    has_grid = grid is not None and grid.is_file()
    if has_grid:
        shutil.copyfile(grid, out_dir / "samples.png")
    kohya = info.get("kohya_file")
    files = ", ".join(f"`{f}`" for f in info["token_files"])
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
        f"- **Trigger prompt** (diffusers): `{info['instance_prompt']}`",
        f"- **Trigger words**: {', '.join(f'`{t}`' for t in toks) or 'none'}"
        + (" — in A1111/Forge type them separated by spaces: `" + " ".join(toks) + "`" if toks else ""),
        f"- **Settings**: step {step}"
        + (f" of {run['max_steps']}" if run.get("max_steps") else "")
        + f", {run.get('num_train_images', '?')} teacher images, {run.get('num_reg_images', 0)} class images, "
        f"resolution {run.get('resolution', '?')}, lr {run.get('learning_rate', '?')}, "
        f"target modules {', '.join(info['target_modules'])}"
        + (", text encoder trained" if info["train_text_encoder"] else ""),
        f"- **KID at this step**: {kid}",
        "",
    ]
    if has_curve:
        lines += ["![KID while training](kid_curve.png)", ""]
    if has_grid:
        lines += ["Samples at this step (KID round's fixed seeds; second row: the class prompt):", "",
                  "![samples](samples.png)", ""]  # fmt: skip
    lines += [
        "## Which file each front-end loads",
        "",
        "| front-end | load | prompt |",
        "|---|---|---|",
        f"| diffusers | this directory: `pytorch_lora_weights.safetensors` + {files} | `{info['instance_prompt']}` |",
    ]
    if kohya:
        lines += [
            f"| AUTOMATIC1111 / Forge | `{kohya}` into `models/Lora` (tokens bundled inside) | "
            f"`<lora:{Path(kohya).stem}:1> {' '.join(toks)}` |",
            f"| ComfyUI | `{kohya}` into `models/loras`, {files} into `models/embeddings` | "
            + " ".join(f"`embedding:{Path(f).stem}`" for f in info["token_files"])
            + " |",
        ]
    lines += [
        "",
        "## diffusers",
        "",
        "```python",
        "from diffusers import StableDiffusionPipeline",
        "",
        f'pipe = StableDiffusionPipeline.from_pretrained("{info["base_model"]}")',
        'pipe.load_lora_weights("THIS_DIR")',
        "pipe.load_textual_inversion([" + ", ".join(f'"THIS_DIR/{f}"' for f in info["token_files"]) + "])",
        f'image = pipe("{info["instance_prompt"]}").images[0]',
        "```",
        "",
        "Or look at it with dallm: `python -m dallm sample --lora THIS_DIR --compare`.",
        "",
    ]
    path = out_dir / "README.md"
    path.write_text("\n".join(lines))
    return path
