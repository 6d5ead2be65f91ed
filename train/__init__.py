"""unconfuse.train: what the recipes share (config, run lifecycle, data, losses, callbacks), and the
commands above the recipes (train/commands)."""
import warnings

# TRL and peft still read transformers' deprecated `is_gradient_checkpointing`: their warning, which no
# setting of ours can change, would otherwise print on every LoRA run
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
