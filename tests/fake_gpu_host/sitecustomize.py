"""Make every Python process started with this folder on PYTHONPATH believe it runs on a host with one CUDA
device, as a GPU host's driver reports it: torch.cuda.is_available() is True and device_count() is 1 unless
CUDA_VISIBLE_DEVICES hides the device ("" hides it, as on a real host). Nothing can run on the pretend device
("Found no NVIDIA driver"), so any test that picks it fails: this checks that the default tier pins the CPU
in itself and in every process it starts.

    PYTHONPATH=tests/fake_gpu_host pytest            # must pass as plain `pytest` does
    PYTHONPATH=tests/fake_gpu_host DTRAIN_TEST_CUDA=1 pytest -x   # without the tests' hiding: fails fast
"""

import os


def _visible() -> bool:  # read when asked, as the driver reads it when CUDA first starts
    return os.environ.get("CUDA_VISIBLE_DEVICES", "0") != ""


try:
    import torch
except ImportError:
    pass
else:
    torch.cuda.is_available = _visible
    torch.cuda.device_count = lambda: int(_visible())
