import os

import torch

# Without a GPU, the Triton kernels run in Triton's interpreter on CPU tensors. It must be switched on
# before any test module imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
