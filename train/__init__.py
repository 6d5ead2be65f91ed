"""unconfuse.train: what the recipes share: the run lifecycle (``lifecycle``), checkpoints and launch state,
configs, data, losses and callbacks."""
