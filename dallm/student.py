"""The student: the frozen base with LoRA and placeholder tokens attached, prompt encoding, the adapter switch.

`Student` is a mixin of `dallm.module.DallmModule` (a LightningModule), not a submodule of it: the base's
parts stay attributes of the LightningModule (`unet`, `text_encoder`, `vae`), so the names of the trainable
weights in checkpoints are the ones earlier versions wrote, and their checkpoints still resume.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from lightning.pytorch.utilities import rank_zero_info

from dallm import lora, tokens
from dallm.cache import LatentCache, vae_identity


def init_seed(seed: int, salt: int) -> int:
    """Seed of one initialisation (salt: which one) as a pure function of the run seed."""
    return ((seed * 1_000_003 + salt) * 2_654_435_761) % (2**63)


@contextmanager
def seeded(seed: int):
    """Draw from the global generators seeded with `seed` inside, and leave their state as it was after.

    peft and the token initialisation draw from the global generator; this makes them a function of the
    run seed, whatever the data module, callbacks or feature nets drew before.
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# Stored half dtype of the frozen base for each mixed-precision setting of the trainer.
_FROZEN_DTYPE = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}



class Student:
    """Loading and attaching the base, its trainable parts, prompt encoding and sampling (needs `hparams`)."""

    def frozen_dtype(self) -> torch.dtype:
        """Dtype of the frozen base: half when the trainer runs mixed precision, else fp32."""
        trainer = self._trainer
        return (
            _FROZEN_DTYPE.get(str(trainer.precision), torch.float32) if trainer is not None else torch.float32
        )

    def configure_model(self) -> None:
        """Load the frozen base once, add placeholder tokens and LoRA (idempotent)."""
        if self.unet is not None:
            return
        self.attach_base(**self.load_base())

    def load_base(self) -> dict:
        """Tokenizer, noise scheduler, text encoder, VAE and UNet of the base model, in the frozen dtype."""
        from dallm.base import load_base_parts

        hp = self.hparams
        return load_base_parts(
            hp.pretrained_model_name_or_path,
            revision=hp.revision,
            variant=hp.variant,
            dtype=self.frozen_dtype(),
        )

    def attach_base(
        self, tokenizer, noise_scheduler, text_encoder, vae, unet, tokenizer_2=None, text_encoder_2=None
    ) -> None:
        """Freeze the base parts, add placeholder tokens and LoRA, and make them this module's.

        Separate from loading so that benchmarks can attach a full-size architecture with random weights.
        `tokenizer_2`/`text_encoder_2`: SDXL's second text encoder; the placeholder tokens get rows in both.
        """
        from diffusers.training_utils import cast_training_params

        hp = self.hparams
        if text_encoder_2 is not None and hp.train_text_encoder:
            raise ValueError(
                "--model.train_text_encoder: a text-encoder LoRA is not supported for SDXL yet (the placeholder "
                "tokens are learned in both encoders); set it to false"
            )
        self.tokenizer, self.noise_scheduler = tokenizer, noise_scheduler
        self.tokenizer_2 = tokenizer_2
        for part in (text_encoder, vae, unet, text_encoder_2):
            if part is not None:
                part.requires_grad_(False)
                part.eval()

        lora.check_target_modules(unet, hp.target_modules, "--model.target_modules")
        # Each initialisation from its own seed of the run: independent of anything drawn before it.
        with seeded(init_seed(hp.seed, 1)):
            lora.add_lora(unet, lora.lora_config(hp.rank, hp.alpha, hp.lora_dropout, hp.target_modules, hp.use_dora))
        if hp.train_text_encoder:
            lora.check_target_modules(
                text_encoder, hp.text_encoder_target_modules, "--model.text_encoder_target_modules"
            )
            with seeded(init_seed(hp.seed, 2)):
                lora.add_lora(
                    text_encoder,
                    lora.lora_config(
                        hp.rank, hp.alpha, hp.lora_dropout, hp.text_encoder_target_modules, hp.use_dora
                    ),
                )
        if hp.placeholder_tokens:
            with seeded(init_seed(hp.seed, 3)):
                tokens.add_placeholder_tokens(
                    self.tokenizer, text_encoder, list(hp.placeholder_tokens), hp.initializer_token
                )
            if text_encoder_2 is not None:  # one row per token in each encoder, as diffusers' SDXL scripts
                with seeded(init_seed(hp.seed, 4)):
                    tokens.add_placeholder_tokens(
                        tokenizer_2, text_encoder_2, list(hp.placeholder_tokens), hp.initializer_token
                    )
        # Frozen base stays in its (half) dtype; only the trainable parameters are fp32.
        cast_training_params([m for m in (unet, text_encoder, text_encoder_2) if m is not None], dtype=torch.float32)

        if hp.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if hp.channels_last:
            unet.to(memory_format=torch.channels_last)
        if hp.compile:
            unet.compile()  # in place: parameter names (and so checkpoints) stay the same
        if hp.cache_latents:
            self.latent_cache = LatentCache(
                vae_identity(vae, str(hp.pretrained_model_name_or_path)), hp.cache_dir
            )
        self.vae, self.text_encoder, self.unet = vae, text_encoder, unet
        self.text_encoder_2 = text_encoder_2
        if hp.get("ema_decay", 0.0) > 0:
            from dallm.ema import WeightAverage

            self.ema = WeightAverage([(n, p) for n, p in self.named_parameters() if p.requires_grad], hp.ema_decay)
        trainable, total = lora.count_parameters(self)
        self.param_counts = {"trainable": trainable, "total": total}
        rank_zero_info(
            f"dallm: trainable parameters {trainable:,} of {total:,} ({100 * trainable / total:.3f}%); "
            f"frozen base stored as {unet.dtype}"
        )

    @property
    def token_embedding(self) -> tokens.PlaceholderEmbedding | None:
        emb = self.text_encoder.get_input_embeddings()
        return emb if isinstance(emb, tokens.PlaceholderEmbedding) else None

    @property
    def token_embedding_2(self) -> tokens.PlaceholderEmbedding | None:
        """SDXL's second encoder's placeholder rows (None for SD v1-5)."""
        emb = self.text_encoder_2.get_input_embeddings() if self.text_encoder_2 is not None else None
        return emb if isinstance(emb, tokens.PlaceholderEmbedding) else None

    def train(self, mode: bool = True):
        """Keep the frozen VAE and text encoder in eval mode whatever Lightning asks.

        The UNet follows `mode` only for the LoRA dropout; its own layers have no dropout in SD.
        """
        super().train(mode)
        if self.unet is not None:
            self.vae.eval()
            if self.text_encoder_2 is not None:
                self.text_encoder_2.eval()
            if not self.hparams.train_text_encoder:
                self.text_encoder.eval()
        return self

    def encode_prompts(self, prompts: list[str], cache: bool = True):
        """Prompt strings -> CLIP hidden states (N, L, D), each distinct prompt encoded once; for SDXL the
        pair (hidden (N, L, D1 + D2), pooled (N, P)) of dallm.sdxl.encode_prompts.

        A prompt without placeholder tokens gives the same states at every step when the text encoder
        has no LoRA (the new rows only change sequences that contain them), so its states are cached.
        Readouts pass cache=False: what training reads from the cache never depends on what they encoded.
        """
        cacheable = cache and not self.hparams.train_text_encoder
        unique = list(dict.fromkeys(prompts))
        todo = [p for p in unique if not (cacheable and p in self._text_cache)]
        states = {p: self._text_cache[p] for p in unique if p not in todo}
        if todo:
            ids = self.tokenizer(
                todo,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            if self.text_encoder_2 is None:
                hidden = self.text_encoder(ids)[0]  # (U, L, D)
            else:
                from dallm.sdxl import encode_prompts

                # Each prompt on its own, as encode_each does for latents: batched, CLIP's states moved in the
                # 8th digit with the batch's other prompts (which a resume's empty cache changes).
                parts = [self.tokenizer, self.tokenizer_2], [self.text_encoder, self.text_encoder_2]
                hidden = [tuple(x[0] for x in encode_prompts(*parts, [p])) for p in todo]  # U x ((L, D), (P,))
            for p, h in zip(todo, hidden, strict=True):
                states[p] = h
                if cacheable and not any(t in p for t in self.hparams.placeholder_tokens):
                    self._text_cache[p] = h.detach() if self.text_encoder_2 is None else tuple(x.detach() for x in h)
        if self.text_encoder_2 is None:
            return torch.stack([states[p] for p in prompts])
        return torch.stack([states[p][0] for p in prompts]), torch.stack([states[p][1] for p in prompts])

    def denoise(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, prompts: list[str], time_ids=None, cache: bool = True
    ) -> torch.Tensor:
        """The UNet's prediction for noisy latents (N, 4, h, w) at `timesteps` (N,) under `prompts` (N).

        SDXL also takes the pooled embeddings and each image's time ids (N, 6) (the batch's "time_ids"; None:
        an uncropped image of the latents' size, as the pipeline samples).
        """
        cond = self.encode_prompts(prompts, cache)
        if self.text_encoder_2 is None:
            return self.unet(noisy, timesteps, cond).sample
        from dallm import sdxl

        hidden, pooled = cond
        if time_ids is None:
            scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
            time_ids = sdxl.default_time_ids(len(noisy), noisy.shape[-2] * scale, noisy.shape[-1] * scale, noisy.device)
        added = sdxl.unet_added_conditions(pooled, time_ids, hidden.dtype)
        return self.unet(noisy, timesteps, hidden, added_cond_kwargs=added).sample

    @contextmanager
    def base_only(self):
        """The frozen base inside: LoRA layers of the UNet (and text encoder, if it has them) switched off."""
        from diffusers.utils.peft_utils import set_adapter_layers

        parts = [self.unet] + ([self.text_encoder] if self.hparams.train_text_encoder else [])  # SDXL: no te LoRA
        for part in parts:
            set_adapter_layers(part, enabled=False)
        try:
            yield
        finally:
            for part in parts:
                set_adapter_layers(part, enabled=True)

    def trainable_groups(self) -> list[dict]:
        """Parameter groups: LoRA (optimizer lr) and placeholder tokens (token_lr, no weight decay)."""
        token_params = [e.new_embeddings for e in (self.token_embedding, self.token_embedding_2) if e is not None]
        token_ids = {id(p) for p in token_params}
        lora_params = [p for p in self.parameters() if p.requires_grad and id(p) not in token_ids]
        groups = [{"params": lora_params, "name": "lora"}]
        if token_params:
            groups.append(
                {"params": token_params, "name": "tokens", "lr": self.hparams.token_lr, "weight_decay": 0.0}
            )
        return groups

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """State-dict entries of the trainable parameters only (LoRA + token rows)."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def pipeline(self, scheduler=None):
        """A diffusers pipeline over this module's own (LoRA-carrying) parts; no copies."""
        from diffusers import DPMSolverMultistepScheduler

        from dallm.base import pipeline_from_parts

        if scheduler is None:
            scheduler = DPMSolverMultistepScheduler.from_config(self.noise_scheduler.config)
        return pipeline_from_parts(
            self.tokenizer, self.text_encoder, self.vae, self.unet, scheduler, self.tokenizer_2, self.text_encoder_2
        )

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        seeds: list[int],
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        resolution: int | None = None,
        scheduler=None,
        output_type: str = "pil",
    ):
        """Sample one image per seed for `prompt` with the current weights (eval mode, restored after)."""
        was_training = self.training
        self.eval()
        try:
            pipe = self.pipeline(scheduler)
            generators = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]
            autocast = torch.autocast(
                self.device.type, dtype=self.vae.dtype, enabled=self.vae.dtype != torch.float32
            )
            with autocast:
                out = pipe(
                    prompt=[prompt] * len(seeds),
                    generator=generators,
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    height=resolution,
                    width=resolution,
                    output_type=output_type,
                )
            return out.images
        finally:
            self.train(was_training)
