"""The sweep wing: `dallm sweep` (a grid of runs x seeds, local or SLURM) and `dallm report` over its runs."""
