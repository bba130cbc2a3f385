"""Triton kernels, one op family a module; installed as `decoding.kernels` (see setup.py).

Each module registers its ops as `torch.library.triton_op("decoding::<op>_triton")`. Importing one
needs triton; with TRITON_INTERPRET=1 set before the import, the kernels run on CPU tensors.
"""
