"""Attention masks (pure torch) and the Triton flash-attention kernel.

The kernel needs triton, so importing this package does not import it: use
`from causal_flash.flash_attention import flash_attention` where the kernel is wanted (on CUDA, or on CPU under
TRITON_INTERPRET=1 set before that import). A package-level `flash_attention` name would be shadowed by the
submodule of the same name as soon as anything imports the submodule, so there is deliberately none.
"""
from .mask import block_mask, token_blocks
