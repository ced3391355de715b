"""dtrain: distributed training for PyTorch with Hydra configs, torchrun/SLURM launch, DDP and exact resume.

Entry points: `python -m dtrain` (train), `python -m dtrain.evaluate` (evaluate a checkpoint).
"""

__version__ = "0.1.0"
