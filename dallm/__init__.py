"""dallm: align a small text-to-image model with a larger one (LoRA + pivotal tokens + prior preservation, KID)."""

__version__ = "0.1.0"
