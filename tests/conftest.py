import os

# Must precede the first `import triton` anywhere in the process (see environment.md): on a machine without CUDA
# the kernels run in Triton's interpreter. On a GPU machine run with TRITON_INTERPRET=0 to test compiled kernels.
os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("LK_TEST_GPU") == "1" else "1")

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ["TRITON_INTERPRET"] not in ("", "0")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA and compiled Triton (TRITON_INTERPRET=0)")
    for item in items:
        if "gpu" in item.keywords and (not HAS_CUDA or INTERPRET):
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    """Where kernel tests run: CUDA when compiled Triton is available, else CPU under the interpreter."""
    return torch.device("cuda" if HAS_CUDA and not INTERPRET else "cpu")
