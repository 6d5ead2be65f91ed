"""unconfuse.train: the top-level CLI (training pieces come with the recipe issues)."""
