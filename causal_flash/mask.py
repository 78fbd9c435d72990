"""The one definition of which key a query may see, shared by the SDPA path and the Triton kernel.

Tokens are frame-major (all tokens of frame 0, then frame 1, ...). A *block* is `tokens_per_block`
consecutive tokens (frames_per_block frames). Two layouts:

- plain (`clean_len == 0`): block-causal. Query in block b sees keys of blocks <= b
  (bidirectional inside its own block, causal across blocks).
- teacher forcing (`clean_len == L > 0`): the sequence is [clean copy (L tokens) | noisy copy (L tokens)].
  A clean query of block b sees clean keys of blocks <= b. A noisy query of block b sees clean keys of
  blocks < b and the noisy keys of its own block b, never another block's noisy tokens.

Both rules are one rule: every token has (block, noisy); key k is visible to query q iff
    (not k.noisy and (k.block < q.block or (k.block == q.block and not q.noisy)))
    or (k.noisy and q.noisy and k.block == q.block).
The diagonal is always visible, so no row is empty.
"""
import torch


def token_blocks(length, tokens_per_block, clean_len, device=None):
    """Per-token block index and noisy flag for a sequence of `length` tokens."""
    idx = torch.arange(length, device=device)
    noisy = idx >= clean_len if clean_len > 0 else torch.zeros_like(idx, dtype=torch.bool)
    local = torch.where(noisy, idx - clean_len, idx)
    return local // tokens_per_block, noisy


def block_mask(length, tokens_per_block, clean_len=0, device=None):
    """Boolean [length, length] mask, True where the query (row) may attend to the key (column)."""
    blk, noisy = token_blocks(length, tokens_per_block, clean_len, device)
    qb, kb = blk[:, None], blk[None, :]
    qn, kn = noisy[:, None], noisy[None, :]
    see_clean = ~kn & ((kb < qb) | ((kb == qb) & ~qn))
    see_noisy = kn & qn & (kb == qb)
    return see_clean | see_noisy
