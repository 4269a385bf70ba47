"""Fast paths for sparse (TopK-style) SAEs, for CPU (PyTorch) and CUDA (Triton kernels, `backend` decides).

`sparse_decode` / `sparse_decode_groups` (embedding-bag decoder with a sparse backward),
`sparse_encoder_values` (encoder gradient through the selected codes only), `topk_select` / `dead_topk`
(exact grouped top-k selection), the row primitives they share (`SlotPlan` sorts a step's slots once) and
AuxK on the gathered dead sub-dictionary (`auxk`). Each matches the plain dense computation to float tolerance (tests/test_kernels.py).
"""

from saelab.kernels.decode import sparse_decode, sparse_decode_groups
from saelab.kernels.encode import sparse_encoder_values
from saelab.kernels.rows import SlotPlan, accumulate_rows, gather_dot
from saelab.kernels.select import dead_topk, default_group_size, topk_select

__all__ = [
    "SlotPlan",
    "accumulate_rows",
    "dead_topk",
    "default_group_size",
    "gather_dot",
    "sparse_decode",
    "sparse_decode_groups",
    "sparse_encoder_values",
    "topk_select",
]
