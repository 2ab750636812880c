import pytest
import torch
import torchvision

import chip_ext
from chip_ext._extension import _C

HAS_GPU = torch.cuda.is_available()
NO_GPU_REASON = "no CUDA GPU visible (CUDA tests run unchanged on the GPU machine)"


def devices():
    """cpu always; cuda with the `cuda` marker, skipped with a reason when no GPU is visible."""
    return [
        pytest.param("cpu", id="cpu"),
        pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda,
                                                pytest.mark.skipif(not HAS_GPU, reason=NO_GPU_REASON)]),
    ]


@pytest.fixture(autouse=True)
def poison_outputs():
    """Every fresh kernel output starts as NaN, so an element a kernel does not write fails."""
    _C._set_poison_outputs(True)
    yield
    _C._set_poison_outputs(False)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(1234)


def pytest_report_header(config):
    info = chip_ext.build_info()
    return (f"chip_ext built with torch {info['torch_version']}, CUDA kernels: {info['with_cuda']}, "
            f"GPU visible: {info['gpu_visible']}")


@pytest.fixture(scope="module")
def resnet():
    """torchvision ResNet-18 with fixed random weights, in eval mode (no download)."""
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()
