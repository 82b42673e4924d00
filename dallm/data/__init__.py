"""The data wing: the DataModule and what it reads, teacher images and class images as a seeded, step-indexed stream."""
