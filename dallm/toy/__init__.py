"""The offline toy world: procedural images, a tiny pretrained base model and a feature net."""
