"""The export wing: a trained LoRA and its tokens in the formats other tools load, its model card, `dallm export` and `dallm sample`."""
