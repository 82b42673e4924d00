"""The teacher wing: `dallm teacher` and the backends that fill a teacher directory (OpenAI, a diffusers pipeline, a folder)."""
