"""Checks that need only the config, the tokenizer or a file listing, run before anything is written.

`fit` generates class images, loads the UNet and writes logs before the first step; every mistake this
module can see from the parsed config alone is refused before those minutes are spent, naming the flag.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dallm import lora, resume, tokens
from dallm.errors import DallmError


def nearest_existing(path: Path) -> Path:
    """`path` itself or its closest ancestor that exists (what a mkdir -p would start from)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_dir(path: str | Path, flag: str) -> None:
    """Refuse a directory dallm will create/write that cannot be: a regular file, or on a read-only place.

    Writes nothing: `os.access` answers for permissions and read-only file systems alike.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DallmError(f"{flag} {path}: is a file, not a directory")
    base = nearest_existing(path)
    if not base.is_dir():
        raise DallmError(f"{flag} {path}: {base} is a file, not a directory")
    read_only = bool(os.statvfs(base).f_flag & os.ST_RDONLY) if hasattr(os, "statvfs") else False
    if read_only or not os.access(base, os.W_OK | os.X_OK):
        raise DallmError(f"{flag} {path}: {base} is not writable (permissions or a read-only file system)")


def check_optimizer(spec: Any) -> None:
    """Build the optimizer once on a dummy parameter, so bad settings fail now and name the flag."""
    if spec is None or not hasattr(spec, "get") or not spec.get("class_path"):
        return
    from jsonargparse import Namespace
    from lightning.pytorch.cli import instantiate_class

    args = spec.get("init_args")
    args = args.as_dict() if isinstance(args, Namespace) else dict(args or {})
    lr = args.get("lr")
    if isinstance(lr, (int, float)) and lr <= 0:
        raise DallmError(f"--model.optimizer.lr must be > 0, got {lr}")
    try:
        instantiate_class(
            ([torch.nn.Parameter(torch.zeros(1))],), {"class_path": spec.class_path, "init_args": args}
        )
    except (ValueError, TypeError) as err:
        # Name the init arg the optimizer complains about ("Invalid weight_decay value: -1.0").
        named = next((k for k in sorted(args, key=len, reverse=True) if k in str(err)), None)
        flag = f"--model.optimizer.{named}" if named else "--model.optimizer"
        raise DallmError(f"{flag} ({spec.class_path}): {err}") from err
    except (ImportError, RuntimeError):
        return  # e.g. a CUDA-only optimizer on a CPU login node: the real construction will say


def check_tokens(model: Any) -> None:
    """Placeholder and initializer tokens against the base model's tokenizer (loads only the tokenizer)."""
    placeholder = list(model.get("placeholder_tokens") or [])
    if not placeholder and model.get("initializer_token") is None:
        return
    from transformers import CLIPTokenizer

    src = model.get("pretrained_model_name_or_path")
    if Path(str(src)).is_dir() and not (Path(str(src)) / "tokenizer").is_dir():
        # transformers would build an empty tokenizer from nothing and every token check would pass.
        raise DallmError(
            f"--model.pretrained_model_name_or_path {src}: no tokenizer/ folder; a base model directory "
            "has the diffusers layout (vae/, text_encoder/, tokenizer/, unet/, scheduler/)"
        )
    try:
        tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", revision=model.get("revision"))
    except (OSError, ValueError) as err:
        where = (
            "local directory"
            if Path(str(src)).exists()
            else "hub id (is HF_HUB_OFFLINE set, or is it cached?)"
        )
        raise DallmError(
            f"--model.pretrained_model_name_or_path: cannot load the tokenizer of {src!r} as a {where}: "
            f"{(str(err).splitlines() or [''])[0]}"
        ) from err
    if placeholder:
        tokens.check_placeholder_tokens(tokenizer, placeholder, model.get("initializer_token"))


def check_config_files(argv: list[str]) -> None:
    """Read every `--config FILE` of the command line as YAML first, so a syntax error names the file.

    jsonargparse parses the file's text and reports `"<unicode string>", line 1` without the file name.
    """
    import yaml

    paths = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")]
    paths += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for path in paths:
        try:
            text = Path(path).read_text()
        except OSError:
            continue  # jsonargparse's own message names a missing file
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise DallmError(f"--config {path}: malformed YAML{where}: {problem}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise DallmError(
                f"--config {path}: expected a mapping of sections (model:, data:, trainer:, ...), "
                f"got a {type(loaded).__name__}"
            )


def check_lora_targets(model: Any) -> None:
    """--model.target_modules (and the text encoder's) against the base's architecture, built from its
    config files on the meta device: no weights are read, nothing is allocated."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    src, revision = model.get("pretrained_model_name_or_path"), model.get("revision")
    parts = [("unet", "--model.target_modules", model.get("target_modules"))]
    if model.get("train_text_encoder"):
        parts.append(
            ("text_encoder", "--model.text_encoder_target_modules", model.get("text_encoder_target_modules"))
        )
    for subfolder, flag, targets in parts:
        try:
            if subfolder == "unet":
                config = UNet2DConditionModel.load_config(src, subfolder=subfolder, revision=revision)
            else:
                config = CLIPTextConfig.from_pretrained(src, subfolder=subfolder, revision=revision)
        except (OSError, ValueError):
            return  # an unreadable base is the loader's to report, naming the flag
        with torch.device("meta"):
            net = UNet2DConditionModel.from_config(config) if subfolder == "unet" else CLIPTextModel(config)
        try:
            lora.check_target_modules(net, list(targets or []), flag)
        except ValueError as err:
            raise DallmError(str(err)) from err


def check_config(cfg: Any, subcommand: str) -> None:
    """All early checks of a `fit`/`validate` config; resolves `--ckpt_path last` on the way."""
    if subcommand == "fit":
        max_steps = cfg.trainer.get("max_steps")
        if max_steps is None or max_steps <= 0:
            raise DallmError(
                f"--trainer.max_steps must be > 0, got {max_steps}: dallm trains for a number of steps"
            )
    if cfg.get("weights_only") is False:
        raise DallmError(
            "--weights_only false: dallm checkpoints hold only tensors and plain data, and a checkpoint "
            "loaded with weights_only=False can run arbitrary code"
        )
    if "weights_only" in cfg:
        cfg.weights_only = True  # the explicit safe load, whatever torch's default
    data = cfg.get("data")
    if data is not None and data.get("class_prompt") and data.get("prior_dir"):
        check_writable_dir(data.prior_dir, "--data.prior_dir")
    logger = cfg.trainer.get("logger")
    init = getattr(logger, "init_args", None)
    if init is not None and init.get("save_dir"):
        check_writable_dir(init.save_dir, "--trainer.logger.init_args.save_dir")
    leftovers = resume.resolve_last_checkpoint(cfg) if subcommand == "fit" else []
    resume.check_resume(cfg, subcommand)
    if cfg.get("model") is not None:
        check_optimizer(cfg.model.get("optimizer"))
        check_tokens(cfg.model)
        check_lora_targets(cfg.model)
    resume.tidy(leftovers, cfg.get("ckpt_path"))  # the first write of an accepted resume, after every check passed
