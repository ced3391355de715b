"""dtrain: distributed training for PyTorch with Hydra configs, torchrun/SLURM launch, DDP and exact resume.

Entry points:
    python -m dtrain [key=value ...]          train (one process; under torchrun or srun, one rank of many)
    dtrain-launch [key=value ...]             validate once, then start the workers with torchrun's agent
                                              (also `python -m dtrain.launch`)
    python -m dtrain.evaluate ckpt=PATH       a checkpoint's loss and metrics on a split
    python -m dtrain.predict ckpt=PATH input=PATH     predictions for images, tensors or a table
    python -m dtrain.export ckpt=PATH format=onnx|torchscript|state_dict out=PATH
    python -m dtrain.plots redraw|compare     the run's plots, again or side by side

From Python (`import dtrain`): `fit(model, data, ...)` trains your own objects; `load_model`, `evaluate`,
`predict` and `export` use a checkpoint; `dtrain.api` has the rest (`train` with command-line overrides,
`read_metrics`, `read_summary`, ...). torch is imported only when one of these is first used.
"""

__version__ = "0.1.0"

_PUBLIC = ("fit", "load_model", "evaluate", "predict", "export")
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        from dtrain import api
        return getattr(api, name)
    raise AttributeError(f"module 'dtrain' has no attribute {name!r}")
