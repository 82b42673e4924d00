"""The LightningModule: a frozen Stable Diffusion base, LoRA on its attention, learned placeholder tokens."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from dallm import diffusion, lora, step, tokens
from dallm.cache import LatentCache
from dallm.errors import DallmError
from dallm.lora import DEFAULT_TEXT_ENCODER_TARGETS, DEFAULT_UNET_TARGETS
from dallm.objective import check_hold_arguments
from dallm.ranges import Count, NonNegativeFinite, PositiveFinite, Seed, UnitIntervalOpenRight
from dallm.student import Student


class DivergedError(DallmError, FloatingPointError):
    """Training produced a non-finite loss or non-finite trainable weights; the run stops."""


class DallmModule(Student, pl.LightningModule):
    """Fine-tune Stable Diffusion with LoRA + pivotal tokens + DreamBooth prior preservation.

    The student it trains (frozen base, LoRA, tokens, prompt encoding, sampling) is `dallm.student.Student`.
    Over 250 lines because `__init__` is the `--model.*` flags with their documentation (the `--help`) and checks.
    """

    def __init__(
        self,
        pretrained_model_name_or_path: str = "stable-diffusion-v1-5/stable-diffusion-v1-5",
        revision: str | None = None,
        variant: str | None = None,
        rank: Count = 4,
        alpha: PositiveFinite | None = None,
        lora_dropout: UnitIntervalOpenRight = 0.0,
        target_modules: list[str] = DEFAULT_UNET_TARGETS,
        train_text_encoder: bool = False,
        text_encoder_target_modules: list[str] = DEFAULT_TEXT_ENCODER_TARGETS,
        placeholder_tokens: list[str] = ["<s1>", "<s2>"],  # noqa: B006 (jsonargparse needs a literal default)
        initializer_token: str | None = "painting",
        token_lr: PositiveFinite = 1e-3,
        instance_prompt: str = "a realistic painting of a cat in baroque art style like <s1><s2>",
        prior_loss_weight: NonNegativeFinite = 1.0,
        uncond_loss_weight: NonNegativeFinite = 0.0,
        class_prompt: str | None = None,
        hold_weight: NonNegativeFinite = 0.0,
        hold_prompts: list[str] = [],  # noqa: B006 (jsonargparse needs a literal default)
        hold_latents: str = "all",
        uncond_latents: str = "all",
        instance_guidance_scale: PositiveFinite = 1.0,
        instance_guidance_anchor: str = "empty",
        ema_decay: UnitIntervalOpenRight = 0.0,
        snr_gamma: PositiveFinite | None = None,
        noise_offset: NonNegativeFinite = 0.0,
        use_dora: bool = False,
        seed: Seed = 0,
        cache_latents: bool = True,
        cache_dir: str | None = None,
        gradient_checkpointing: bool = False,
        channels_last: bool = False,
        compile: bool = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        """
        Args:
            pretrained_model_name_or_path: base model: a hub id or a local directory in the diffusers layout
                (vae/, text_encoder/, tokenizer/, unet/, scheduler/).
            revision: hub revision (branch, tag or commit) of the base model.
            variant: weight-file variant of the base model, e.g. "fp16".
            rank: LoRA rank r (>= 1).
            alpha: LoRA alpha; the update is scaled by alpha / rank. Default: equal to rank (scale 1).
            lora_dropout: dropout on the LoRA branch, in [0, 1).
            target_modules: UNet modules that get LoRA (suffix match); the default covers Q/K/V/O of every
                self- and cross-attention block.
            train_text_encoder: also put LoRA on the text encoder's attention projections.
            text_encoder_target_modules: text-encoder modules that get LoRA when train_text_encoder is on.
            placeholder_tokens: new tokens learned jointly with LoRA (pivotal tuning); each becomes its own id.
                Empty list: no pivotal tuning.
            initializer_token: a single-token word whose embedding initialises every placeholder token;
                null for a random initialisation at the table's scale.
            token_lr: learning rate of the placeholder-token embeddings (the LoRA uses the optimizer's lr).
            instance_prompt: prompt of the teacher images, used for sampling (linked from --data.instance_prompt).
            prior_loss_weight: weight of the prior-preservation loss on class images.
            uncond_loss_weight: weight of the unconditional-preservation loss: the LoRA model's prediction for
                the empty prompt is pulled to the frozen base's (adapters off) on the same noisy latents, so the
                branch classifier-free guidance extrapolates from stays the base's (no training example carries
                the empty prompt, so nothing else holds it). 0: off. Costs a second UNet pass per step
                (batched with the first) and one frozen forward (RESULTS.md: the toy default needs it).
            class_prompt: the class prompt (linked from --data.class_prompt); held by hold_weight.
            hold_weight: weight of the base-prediction term (OneTrainer's PRIOR_PREDICTION, ai-toolkit's
                diff_output_preservation): the model's prediction for the class prompt (and each of
                hold_prompts) is pulled to the frozen base's (adapters off) on the same noisy latents, so the
                LoRA does not move what it is not trained for. Rows join the step's one batched student call
                and one no-grad base call; no extra images. 0: off.
            hold_prompts: further prompts held at the base's prediction with hold_weight (the class word alone
                does not protect prompts the run never sees); no placeholder tokens.
            hold_latents: latents the held prompts are compared on: "all" of the batch, the teacher images'
                ("instance") or the class images' ("prior").
            uncond_latents: latents the empty prompt is held on (uncond_loss_weight): "all", "instance" or
                "prior", as hold_latents; fewer rows, a cheaper step.
            instance_guidance_scale: take the instance loss through classifier-free guidance at this scale:
                the guided prediction e_base(∅) + w (e(p) - e_base(∅)) is asked to denoise the teacher image
                (dallm.objective.guided_target), so that sampling at guidance w, not 1, reproduces the
                teacher. 1: the plain loss.
            instance_guidance_anchor: the base prediction the guided instance loss extrapolates from: "empty"
                (the empty prompt's, as the sampler does) or "class" (the class prompt's: the teacher is
                learned as a residual on the base's class prediction, only the residual scaled down by w).
            ema_decay: keep an exponential moving average of the LoRA and token weights with this decay (e.g.
                0.99: about the last 100 steps) and sample, measure and export it instead of the raw weights
                (dallm.ema); 0: off.
            snr_gamma: min-SNR-gamma loss weighting (e.g. 5.0); null for the plain MSE.
            noise_offset: add this times a per-sample, per-channel constant N(0, 1) to the diffusion noise
                (Guttenberg 2023; 0.05-0.1 lets the model make darker and brighter images); 0: off.
            use_dora: DoRA, weight-decomposed LoRA (peft's `use_dora`); exports load in diffusers, the kohya
                format is refused (A1111 decomposes the weight differently).
            seed: seed of the per-step noise and timesteps and of the LoRA and token initialisation (linked
                from --data.seed, itself --seed_everything unless given); resume-exact.
            cache_latents: VAE-encode each training-image variant (content, resolution, crop, flip) once and
                reuse its latent distribution; the latent is still sampled per step, so results are unchanged.
            cache_dir: also keep the latent cache on disk here (keyed by image content, resolution, crop,
                flip and VAE identity), so later runs skip the encoding; null: in memory only.
            gradient_checkpointing: recompute UNet activations in the backward pass (less memory, ~30% slower).
            channels_last: UNet in channels-last memory format (faster convolutions on recent GPUs).
            compile: torch.compile the UNet (slow first steps, faster after; GPU).
            optimizer: optimizer of the trainable parameters (LoRA group + token group at token_lr).
            lr_scheduler: learning-rate schedule, stepped every optimizer step; null for a constant rate.
        """
        super().__init__()
        if rank < 1:
            raise ValueError(f"--model.rank must be >= 1, got {rank}")
        if alpha is not None and alpha <= 0:
            raise ValueError(f"--model.alpha must be > 0, got {alpha}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"--model.lora_dropout must be in [0, 1), got {lora_dropout}")
        if prior_loss_weight < 0:
            raise ValueError(f"--model.prior_loss_weight must be >= 0, got {prior_loss_weight}")
        if uncond_loss_weight < 0:
            raise ValueError(f"--model.uncond_loss_weight must be >= 0, got {uncond_loss_weight}")
        check_hold_arguments(
            hold_weight, hold_prompts, hold_latents, uncond_latents, class_prompt, placeholder_tokens,
            instance_guidance_scale, instance_guidance_anchor, ema_decay,
        )  # fmt: skip
        if snr_gamma is not None and snr_gamma <= 0:
            raise ValueError(f"--model.snr_gamma must be > 0, got {snr_gamma}")
        if noise_offset < 0:
            raise ValueError(f"--model.noise_offset must be >= 0, got {noise_offset}")
        if token_lr <= 0:
            raise ValueError(f"--model.token_lr must be > 0, got {token_lr}")
        missing = [t for t in placeholder_tokens if t not in instance_prompt]
        if missing:
            raise ValueError(
                f"--data.instance_prompt {instance_prompt!r} does not contain the placeholder tokens {missing} "
                "(--model.placeholder_tokens): they would never be trained"
            )
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        # The checkpoint holds only what trains; the frozen base is reloaded from its source.
        self.strict_loading = False
        self.unet = None
        self.text_encoder_2 = self.tokenizer_2 = None  # SDXL's second text encoder (dallm.sdxl)
        self.ema = None
        self.latent_cache: LatentCache | None = None
        self._text_cache: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ steps
    def step_generator(self, micro_step: int) -> torch.Generator:
        """Noise source for one micro-batch: a pure function of (seed, step, rank), so resume is exact."""
        seed = (self.hparams.seed * 1_000_003 + micro_step) * 4099 + self.global_rank
        return torch.Generator(device=self.device).manual_seed(seed % (2**63))

    def diffusion_losses(
        self, batch: dict, generator: torch.Generator | list[torch.Generator]
    ) -> torch.Tensor:
        """Per-sample (weighted) diffusion losses of a batch: (N,).

        `generator` is one generator for the batch, or one per sample (each sample's latent noise,
        diffusion noise and timestep then come from its own generator, whatever the batch holds).
        """
        return self.step_losses(batch, generator, uncond=False, plain=True)["diffusion"]

    def step_losses(
        self, batch: dict, generator: torch.Generator | list[torch.Generator], uncond: bool, plain: bool = False
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses of one step ("diffusion", and "uncond" / "hold" when on): dallm.step."""
        return step.step_losses(self, batch, generator, uncond, plain)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        accumulate = self.trainer.accumulate_grad_batches
        micro_step = self.global_step * accumulate + batch_idx % accumulate
        generator = self.step_generator(micro_step)
        if self.hparams.lora_dropout > 0:
            torch.manual_seed(generator.initial_seed())  # dropout draws from the global RNG
        uncond_weight = self.hparams.uncond_loss_weight
        terms = self.step_losses(batch, generator, uncond=uncond_weight > 0)
        loss, loss_instance, loss_prior = diffusion.instance_prior_loss(
            terms["diffusion"], batch["is_prior"].to(self.device), self.hparams.prior_loss_weight
        )
        parts = [("instance", loss_instance), ("prior", loss_prior)]
        for name, weight in (("uncond", uncond_weight), ("hold", self.hparams.get("hold_weight", 0.0))):
            if name in terms:
                value = terms[name].mean()
                loss = loss + weight * value
                parts.append((name, value))
        # Decided together under DDP: a rank that stopped alone would leave the others in the all-reduce.
        if not self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True):
            which = [name for name, value in parts if not torch.isfinite(value)]
            what = f"{'/'.join(which)} loss" if which else "total loss (weighted sum, or on another rank)"
            values = ", ".join(f"{name} {value.item():.4g}" for name, value in parts)
            raise DivergedError(
                f"training diverged at step {self.global_step}: non-finite {what} ({values}); stopped before "
                "the update, the last checkpoint and lora/ export are the last finite ones (try a lower "
                "--model.optimizer.lr)"
            )
        n = len(batch["prompts"])
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/loss_instance", loss_instance, batch_size=n)
        for name, value in parts[1:]:
            self.log(f"train/loss_{name}", value, batch_size=n)
        for group in self.trainer.optimizers[0].param_groups:
            self.log(f"train/lr_{group['name']}", group["lr"], batch_size=n)
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Checked before any on_train_batch_end hook, so ModelCheckpoint never saves the broken state.
        self.check_finite(f"after optimizer step {self.global_step + 1} (step {self.global_step} was finite)")
        if self.ema is not None:
            self.ema.update()

    def nonfinite_parameters(self) -> list[str]:
        """Names of trainable parameters holding NaN or inf (one fused check per step when all are finite)."""
        if self.unet is None:
            return []
        if getattr(self, "_trainable", None) is None:
            self._trainable = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        flags = torch.stack([torch.isfinite(p).all() for _, p in self._trainable])  # (P,)
        if bool(flags.all()):
            return []
        return [n for (n, _), ok in zip(self._trainable, flags.tolist(), strict=True) if not ok]

    def check_finite(self, when: str) -> None:
        """Raise DivergedError naming the first non-finite trainable weights."""
        bad = self.nonfinite_parameters()
        if bad:
            raise DivergedError(
                f"training diverged: {len(bad)} trainable tensors are non-finite {when} (e.g. {bad[0]}); "
                "the last checkpoint and lora/ export are the last finite ones (try a lower --model.optimizer.lr)"
            )

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # Validation draws from its own generators, but its loader's iterator takes a base seed from the
        # global generator (before any validation hook runs): the state is kept here and put back after
        # validation, so observing never shifts the training stream.
        self._rng_before_validation = torch.random.get_rng_state()

    def on_validation_end(self) -> None:
        state = getattr(self, "_rng_before_validation", None)
        if state is not None and self.trainer.state.fn == "fit":
            torch.random.set_rng_state(state)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # Fixed noise and timesteps per held-out image (its own seeded generator), so the curve compares
        # like with like; one batched forward for all of them.
        generators = [
            torch.Generator(device=self.device).manual_seed(int(s)) for s in batch["seeds"].tolist()
        ]
        losses = self.diffusion_losses(batch, generators)
        self.log("val/loss", losses.mean(), batch_size=len(generators), sync_dist=True)

    def on_train_start(self) -> None:
        if self.logger is not None:
            self.logger.log_metrics(
                {
                    "params/trainable": self.param_counts["trainable"],
                    "params/total": self.param_counts["total"],
                    "params/trainable_ratio": self.param_counts["trainable"] / self.param_counts["total"],
                },
                step=self.global_step,
            )

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        optimizer = self.optimizer(self.trainable_groups())
        if self.lr_scheduler is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.lr_scheduler(optimizer), "interval": "step"},
        }

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.check_finite("at a checkpoint save")  # never write a checkpoint of a diverged model
        checkpoint["state_dict"] = self.trainable_state_dict()
        checkpoint["dallm"] = {
            "base": self.hparams.pretrained_model_name_or_path,
            "rank": self.hparams.rank,
            "placeholder_tokens": list(self.hparams.placeholder_tokens),
        }
        if self.ema is not None:
            checkpoint["dallm_ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.configure_model()
        expected = set(self.trainable_state_dict())
        got = set(checkpoint["state_dict"])
        if expected != got:
            raise ValueError(
                f"--ckpt_path: the checkpoint's trainable weights do not match this model "
                f"(missing {sorted(expected - got)[:3]}, unexpected {sorted(got - expected)[:3]}); "
                f"it was made with {checkpoint.get('dallm')}"
            )
        if self.ema is not None and "dallm_ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["dallm_ema"])

    # ------------------------------------------------------------------ export
    def export_info(self) -> dict:
        """What every export records (`dallm.json`, LoRA metadata): base, LoRA shape, tokens, prompt, step."""
        hp = self.hparams
        return {
            "base_model": hp.pretrained_model_name_or_path,
            "revision": hp.revision,
            "rank": hp.rank,
            "alpha": hp.alpha if hp.alpha is not None else hp.rank,
            "target_modules": list(hp.target_modules),
            "train_text_encoder": hp.train_text_encoder,
            "use_dora": bool(hp.get("use_dora", False)),
            "placeholder_tokens": list(hp.placeholder_tokens),
            "instance_prompt": hp.instance_prompt,
            "global_step": self.global_step if self._trainer is not None else None,
            "token_files": [tokens.token_file_name(t) for t in hp.placeholder_tokens],
            # SDXL only (SD v1-5's dallm.json stays as it was): the export writes both encoders' rows
            **({"sdxl": True, "unet_layers_per_block": self.unet.config.layers_per_block}
               if self.text_encoder_2 is not None else {}),  # fmt: skip
        }

    def export(self, out_dir: str | Path) -> Path:
        """Write the LoRA (diffusers format) and the token embeddings (textual-inversion files) to `out_dir`."""
        self.check_finite("at the LoRA export")  # lora/last stays the last finite export
        hp = self.hparams
        info = self.export_info()
        out_dir = Path(out_dir)
        lora.save_diffusers_lora(
            out_dir, self.unet, self.text_encoder if hp.train_text_encoder else None, info
        )
        emb = self.token_embedding
        if emb is not None:
            meta = {
                "base_model": str(hp.pretrained_model_name_or_path),
                "format": "diffusers-textual-inversion",
            }
            tokens.save_token_embeddings(
                out_dir, tokens.embeddings_by_token(emb, list(hp.placeholder_tokens)), meta
            )
        return out_dir
