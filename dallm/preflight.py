"""Checks that need only the config, the tokenizer or a file listing, run before anything is written.

`fit` generates class images, loads the UNet and writes logs before the first step; every mistake this
module can see from the parsed config alone is refused before those minutes are spent, naming the flag.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dallm import contract, lora, resume, tokens
from dallm.errors import DallmError
from dallm.images import check_image_size, list_images
from dallm.manifest import manifest_path, read_manifest


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


def check_tokens(model: Any, data: Any = None) -> None:
    """Placeholder and initializer tokens against the base model's tokenizer (loads only the tokenizer),
    and every prompt the run trains on against the tokenizer's length limit (`check_prompt_lengths`)."""
    placeholder = list(model.get("placeholder_tokens") or [])
    if not placeholder and model.get("initializer_token") is None and data is None:
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
    if data is not None:
        tokenizer.add_tokens(placeholder)  # each placeholder is one token, as the module makes it
        check_prompt_lengths(tokenizer, training_prompts(data))


def training_prompts(data: Any) -> list[tuple[str, str]]:
    """(where it comes from, prompt) of every prompt the run trains on: the instance prompt, or with
    `{prompt}` the instance prompt around each teacher image's manifest prompt, and the class prompt."""
    template = str(data.get("instance_prompt") or "")
    out = []
    if "{prompt}" in template:
        for directory in teacher_dirs(data):
            files = {p.name for p in directory.iterdir()} if directory.is_dir() else set()
            for record in read_manifest(directory):
                name, prompt = Path(str(record.get("file", ""))).name, record.get("prompt")
                if name in files and isinstance(prompt, str) and prompt:
                    where = f"--data.instance_prompt with the {{prompt}} of {directory / name} ({manifest_path(directory)})"
                    out.append((where, template.replace("{prompt}", prompt)))
    elif template:
        out.append(("--data.instance_prompt", template))
    if data.get("class_prompt"):
        out.append(("--data.class_prompt", str(data.class_prompt)))
    return out


def check_prompt_lengths(tokenizer, prompts: list[tuple[str, str]]) -> None:
    """Refuse a prompt longer than the text encoder reads: the tokenizer would cut its tail, placeholder
    tokens included, and the run would train on another prompt than the one it reports."""
    limit = tokenizer.model_max_length
    for where, prompt in prompts:
        count = len(tokenizer(prompt, truncation=False, verbose=False).input_ids)  # start and end tokens too
        if count > limit:
            raise DallmError(
                f"{where}: the prompt {prompt!r} is {count} tokens, more than the {limit} the base model's "
                "text encoder reads (start and end tokens included): its tail, placeholder tokens too, would "
                "be cut off and never trained; shorten it"
            )


def teacher_dirs(data: Any) -> list[Path]:
    """The teacher directories a run reads: --data.teacher_dir, its val/ subfolder, --data.val_teacher_dir."""
    out = [Path(str(data.teacher_dir))] if data.get("teacher_dir") else []
    if out and (out[0] / "val").is_dir() and not data.get("val_teacher_dir"):
        out.append(out[0] / "val")
    if data.get("val_teacher_dir"):
        out.append(Path(str(data.val_teacher_dir)))
    return out


def check_teacher_images(data: Any) -> None:
    """Every teacher image's size from its header (no decoding), before class images are generated.

    The DataModule decodes the images only after prepare_data made the class images; an image over
    `dallm.images.MAX_IMAGE_PIXELS` would be refused then, minutes later.
    """
    from PIL import Image

    for directory in teacher_dirs(data):
        if not directory.is_dir():
            continue  # the DataModule names a missing directory with its flag
        for path in list_images(directory, "--data.teacher_dir"):
            try:
                with Image.open(path) as im:
                    size = im.size
            except Exception:
                continue  # unreadable: the DataModule's decode reports it, naming the file
            check_image_size(path, size)


def check_kid_feature(kid: Any) -> None:
    """--kid.feature's form (and a class_path's import and init_args) before the class images, not at KID setup."""
    if kid is None or not kid.get("every_n_steps"):
        return
    from dallm.measure.feature_spec import check_feature_spec

    try:
        check_feature_spec(kid.get("feature"), kid.get("weights"))
    except (ValueError, ImportError, AttributeError, OSError) as err:
        raise DallmError(f"--kid.feature {kid.get('feature')!r}: {err}") from err


def check_checkpoint_flags(cfg: Any) -> None:
    """Lightning's ModelCheckpoint arguments that are numbers (its own types are plain int)."""
    ckpt = cfg.get("checkpoint") or {}
    for key, low in (("every_n_train_steps", 0), ("every_n_epochs", 0), ("save_top_k", -1)):
        value = ckpt.get(key)
        if value is not None and (isinstance(value, bool) or value < low):
            raise DallmError(f"--checkpoint.{key} must be >= {low}, got {value}")


class DuplicateKey(ValueError):
    """A key given twice in one YAML mapping."""


def _unique_mapping(loader, node, deep=False):
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise DuplicateKey(
                f"key {key!r} appears twice in one mapping (lines {seen[key] + 1} and {key_node.start_mark.line + 1})"
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


def _unique_key_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)
    return Loader


def check_config_files(argv: list[str]) -> None:
    """Read every `--config FILE` of the command line as YAML first, so a syntax error names the file.

    jsonargparse parses the file's text and reports `"<unicode string>", line 1` without the file name.
    """
    import yaml

    UniqueKeyLoader = _unique_key_loader()  # noqa: N806 (a class)
    paths = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")]
    paths += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for path in paths:
        try:
            text = Path(path).read_text()
        except OSError:
            continue  # jsonargparse's own message names a missing file
        try:
            loaded = yaml.load(text, Loader=UniqueKeyLoader)
        except DuplicateKey as err:
            raise DallmError(f"--config {path}: {err} (YAML would silently keep the last)") from err
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise DallmError(f"--config {path}: malformed YAML{where}: {problem}") from err
        if loaded is None:
            raise DallmError(f"--config {path}: the file is empty; a config is a mapping of sections (model:, data:, ...)")
        if not isinstance(loaded, dict):
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
        check_rank(net, list(targets or []), model.get("rank"), flag)


def check_rank(net: torch.nn.Module, targets: list[str], rank: Any, flag: str) -> None:
    """Refuse a --model.rank larger than every target layer can use, before any LoRA matrix is allocated.

    A LoRA update of a d_in x d_out layer has rank at most min(d_in, d_out); a larger rank only adds zeros'
    worth of parameters (rank x (d_in + d_out) each), which for an absurd rank is an allocation failure.
    """
    if not isinstance(rank, int):
        return
    sizes = sorted(
        {
            (m.in_features, m.out_features)
            for t in targets
            for name in lora.matching_modules(net, t)
            if isinstance(m := net.get_submodule(name), torch.nn.Linear)
        }
    )
    useful = max((min(size) for size in sizes), default=None)
    if useful is not None and rank > useful:
        shown = ", ".join(f"{i}x{o}" for i, o in sizes[:8]) + (", ..." if len(sizes) > 8 else "")
        raise DallmError(
            f"--model.rank {rank} is larger than any layer of {flag} can use: a LoRA update of a d_in x d_out "
            f"layer has rank at most min(d_in, d_out), here at most {useful} (layers {shown}); "
            f"choose --model.rank <= {useful}"
        )


def check_config(cfg: Any, subcommand: str) -> None:
    """All early checks of a `fit`/`validate` config; resolves `--ckpt_path last` on the way."""
    if subcommand == "fit":
        max_steps = cfg.trainer.get("max_steps")
        if max_steps is None or max_steps <= 0:
            raise DallmError(
                f"--trainer.max_steps must be > 0, got {max_steps}: dallm trains for a number of steps"
            )
    if cfg.trainer.get("use_distributed_sampler"):
        raise DallmError(
            "--trainer.use_distributed_sampler must stay false: dallm's step-indexed training stream shards "
            "itself across ranks (exact resume); Lightning's sampler would reorder it"
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
    check_checkpoint_flags(cfg)
    leftovers = resume.resolve_last_checkpoint(cfg) if subcommand == "fit" else []
    contract.check_resume(cfg, subcommand)
    if cfg.get("model") is not None:
        check_optimizer(cfg.model.get("optimizer"))
        check_tokens(cfg.model, cfg.get("data"))
        check_lora_targets(cfg.model)
    if cfg.get("data") is not None and cfg.data.get("teacher_dir"):
        check_teacher_images(cfg.data)
    if subcommand == "fit":
        check_kid_feature(cfg.get("kid"))
    run = resume.resumed_run(cfg) if subcommand == "fit" else None
    if run is not None:
        # The first write of an accepted resume, after every check passed: take the run directory (a
        # second writer is refused here), then tidy what a kill left (rank 0 alone: the lock holder).
        resume.lock_run(run, "--ckpt_path")
    if resume.is_global_zero():
        resume.tidy(leftovers, cfg.get("ckpt_path"))
