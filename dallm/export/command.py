"""`dallm export CKPT|LORA_DIR|RUN_DIR --format diffusers,kohya,a1111 --out DIR`: a checkpoint's or an export
directory's LoRA + tokens in the formats of dallm.export.formats, with a model card. A command module: the library
never imports it."""

from __future__ import annotations

import inspect
from pathlib import Path

from dallm.errors import PARSER_KWARGS, DallmError
from dallm.export.formats import check_formats, run_name, write_exports, write_trained
from dallm.export.trained import from_lora_dir, resolve_lora_dir
from dallm.export.trigger import check_trigger_name
from dallm.resume import load_checkpoint, newest_readable, readable


def resolve_source(source: str | Path) -> tuple[str, Path]:
    """("checkpoint", file) or ("lora", export dir) for SOURCE.

    A file is a checkpoint; a directory with dallm.json an export (`lora/last`, `lora/best`, `lora/step=N`);
    a run dir means its `checkpoints/best.ckpt`, else its newest readable checkpoint (last.ckpt, or a newer
    or readable step=*.ckpt when last.ckpt is older, truncated or missing: as `fit --ckpt_path last`
    resumes), else its `lora/best`, else `lora/last`.
    """
    source = Path(source)
    if source.is_file():
        return "checkpoint", source
    if (source / "dallm.json").is_file():
        return "lora", source
    best = source / "checkpoints" / "best.ckpt"
    if best.is_file() and readable(best):
        return "checkpoint", best
    found, notes = newest_readable(source / "checkpoints")
    for note in notes:
        print(f"dallm export: {note}" + (f"; using {found}" if found else ""))
    if found is not None:
        return "checkpoint", found
    try:
        return "lora", resolve_lora_dir(source, "SOURCE")
    except FileNotFoundError:
        why = "; ".join(notes) or "no checkpoints/best.ckpt, last.ckpt or step=*.ckpt"
        raise FileNotFoundError(
            f"SOURCE {source}: not a checkpoint file, an export dir (with dallm.json), nor a run dir with a "
            f"readable checkpoint ({why}) or lora/best|last"
        ) from None


def callback_state(checkpoint: dict, name: str) -> dict:
    """The saved state of the callback class `name` in a Lightning checkpoint ({} if absent)."""
    return next((v for k, v in checkpoint.get("callbacks", {}).items() if k.split("{")[0] == name), {})


def module_from_checkpoint(checkpoint: dict, base: str | None = None):
    """A DallmModule with the checkpoint's hyperparameters and trainable weights (base reloaded from source)."""
    from dallm.module import DallmModule

    accepted = inspect.signature(DallmModule.__init__).parameters
    hp = {k: v for k, v in checkpoint["hyper_parameters"].items() if k in accepted}
    if base is not None:
        hp["pretrained_model_name_or_path"] = base
    module = DallmModule(**hp)
    module.configure_model()
    missing = set(module.trainable_state_dict()) - set(checkpoint["state_dict"])
    if missing:
        raise ValueError(
            f"SOURCE: the checkpoint lacks trainable weights of this model: {sorted(missing)[:3]}"
        )
    module.load_state_dict(checkpoint["state_dict"], strict=False)
    return module.eval()


def export(
    source: str,
    format: str | list[str] = "diffusers,kohya",
    out: str | None = None,
    base: str | None = None,
    name: str | None = None,
) -> int:
    """Export a LoRA + its tokens for diffusers, AUTOMATIC1111, Forge, ComfyUI and kohya, with a model card.

    Every export also holds `<name>.safetensors`, the learned tokens as one embedding: `<name>` is the
    trigger word in every tool (the model card says which file goes where and what to type).

    Args:
        source: a checkpoint (`checkpoints/step=000250.ckpt`), an export dir (`lora/last`, `lora/best`,
            `lora/step=000250`) or a run dir (its best.ckpt, else last.ckpt, else lora/best, else lora/last).
        format: comma-separated or list: diffusers (load_lora_weights), kohya (`<name>-lora.safetensors`:
            A1111, Forge, ComfyUI, kohya, with the embedding file), a1111 (`<name>-a1111.safetensors`: the
            embedding bundled inside, for A1111 alone).
        out: output directory; default `<run dir>/export/step=NNNNNN`.
        base: base model (hub id or directory) instead of the one recorded.
        name: the export's name: the trigger word and the files' stem; default the run's name.
    """
    formats = check_formats(format.split(",") if isinstance(format, str) else list(format))
    if name:
        check_trigger_name(name, "--name")
    kind, path = resolve_source(source)
    if kind == "lora":
        trained, saved = from_lora_dir(path)
        parent = path.resolve().parent
        run_dir = parent.parent if parent.name == "lora" else parent  # lora/last -> the run dir
        run = dict(saved.get("run") or {"name": run_name(run_dir)})
        history, step = list(saved.get("kid_history") or []), int(saved["step"])
        if base is not None:
            trained.info["base_model"] = base
    else:
        run_dir = path.resolve().parent.parent
        checkpoint = load_checkpoint(path, "SOURCE")  # weights_only; an unreadable file is named
        run = dict(callback_state(checkpoint, "LoraExport").get("run_info") or {"name": run_name(run_dir)})
        history = callback_state(checkpoint, "KIDCallback").get("history", [])
        step = int(checkpoint["global_step"])
    if name:
        run["name"] = name
    out_dir = Path(out) if out else run_dir / "export" / f"step={step:06d}"
    if kind == "lora":
        write_trained(trained, out_dir, step, formats, run, history, path / "samples.png")
    else:
        module = module_from_checkpoint(checkpoint, base)
        write_exports(module, out_dir, step, formats, run, history, run_dir / "samples")
    print(f"dallm export: step {step} of {path} -> {out_dir} ({', '.join(formats)})")
    return 0


def export_main(argv: list[str]) -> int:
    """`dallm export CKPT|LORA_DIR|RUN_DIR --format diffusers,kohya --out DIR`; errors on one line, exit status 2."""
    from jsonargparse import CLI

    try:  # other errors reach cli.main's boundary: one line, exit 2
        return CLI(export, args=argv, as_positional=True, prog="dallm export", **PARSER_KWARGS)
    except KeyError as err:  # a checkpoint without dallm's entries
        raise DallmError(f"SOURCE: not a dallm checkpoint (no {err} in it)") from err
