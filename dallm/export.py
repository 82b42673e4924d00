"""`dallm export CKPT|RUN_DIR --format diffusers,kohya --out DIR`: a checkpoint's LoRA + tokens in the formats
of dallm.formats, with a model card. A command module: the library never imports it."""

from __future__ import annotations

import inspect
from pathlib import Path

from dallm.errors import PARSER_KWARGS, DallmError
from dallm.formats import check_formats, run_name, write_exports
from dallm.resume import load_checkpoint


def resolve_checkpoint(source: str | Path) -> Path:
    """A checkpoint file, or a run dir's `checkpoints/best.ckpt`, else its newest readable checkpoint
    (last.ckpt, or a newer or readable step=*.ckpt when last.ckpt is older, truncated or missing: as
    `fit --ckpt_path last` resumes)."""
    from dallm.resume import newest_readable, readable

    source = Path(source)
    if source.is_file():
        return source
    best = source / "checkpoints" / "best.ckpt"
    if best.is_file() and readable(best):
        return best
    found, notes = newest_readable(source / "checkpoints")
    if found is None:
        why = "; ".join(notes) or "no checkpoints/best.ckpt, last.ckpt or step=*.ckpt"
        raise FileNotFoundError(f"SOURCE {source}: not a checkpoint file nor a run dir with a readable one ({why})")
    for note in notes:
        print(f"dallm export: {note}; using {found}")
    return found


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
    """Export a checkpoint's LoRA + tokens for diffusers, AUTOMATIC1111/Forge/ComfyUI (kohya) and a model card.

    Args:
        source: a checkpoint (`checkpoints/step=000250.ckpt`) or a run dir (its best.ckpt, else last.ckpt).
        format: comma-separated or list: diffusers, kohya.
        out: output directory; default `<run dir>/export/step=NNNNNN`.
        base: base model (hub id or directory) instead of the one recorded in the checkpoint.
        name: LoRA name (the kohya file's name, shown by A1111); default the run's name.
    """
    formats = check_formats(format.split(",") if isinstance(format, str) else list(format))
    ckpt_path = resolve_checkpoint(source)
    run_dir = ckpt_path.resolve().parent.parent
    checkpoint = load_checkpoint(ckpt_path, "SOURCE")  # weights_only; an unreadable file is named
    run = dict(callback_state(checkpoint, "LoraExport").get("run_info") or {"name": run_name(run_dir)})
    if name:
        run["name"] = name
    history = callback_state(checkpoint, "KIDCallback").get("history", [])
    step = int(checkpoint["global_step"])
    module = module_from_checkpoint(checkpoint, base)
    out_dir = Path(out) if out else run_dir / "export" / f"step={step:06d}"
    write_exports(module, out_dir, step, formats, run, history, run_dir / "samples")
    print(f"dallm export: step {step} of {ckpt_path} -> {out_dir} ({', '.join(formats)})")
    return 0


def export_main(argv: list[str]) -> int:
    """`dallm export CKPT|RUN_DIR --format diffusers,kohya --out DIR`; errors on one line, exit status 2."""
    from jsonargparse import CLI

    try:  # other errors reach cli.main's boundary: one line, exit 2
        return CLI(export, args=argv, as_positional=True, prog="dallm export", **PARSER_KWARGS)
    except KeyError as err:  # a checkpoint without dallm's entries
        raise DallmError(f"SOURCE: not a dallm checkpoint (no {err} in it)") from err
