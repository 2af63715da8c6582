"""EBT two-stream attention: the frame, the own-key rule, r = 0 vs the time_embed layout, compat.

    python examples/ebt_attention.py
"""

import torch

import flexebt
from flexebt.compat import ebt_attention


def picture(bm: flexebt.EBTBlockMask) -> str:
    """Rows: observed queries, then predicted queries; columns: observed keys, then own keys."""
    rows = bm.to_dense_frame().tolist()
    lines = []
    for i, row in enumerate(rows):
        tag = "o" if i < bm.S_obs else "p"
        lines.append(f"{tag}{i if i < bm.S_obs else i - bm.S_obs:>2} " + "".join("#" if x else "." for x in row))
    return "\n".join(lines)


def main(S: int = 6, B: int = 2, H: int = 2, D: int = 16):
    # r = 0 (ar_ebt_default): S observed tokens, S predictions of the next token each.
    bm0 = flexebt.create_ebt_block_mask(None, None, None, S_obs=S, S_pred=S, BLOCK_SIZE=4)
    print(f"r = 0: predicted i sits at frame i + 1 and sees observed 0..i plus itself\n{picture(bm0)}\n")
    # r = 1 (time_embed layout): a leading time token in the observed stream.
    bm1 = flexebt.create_ebt_block_mask(None, None, None, S_obs=S + 1, S_pred=S, BLOCK_SIZE=4)
    print(f"r = 1: predicted i sits at frame i + 2 and sees observed 0..i+1 plus itself\n{picture(bm1)}\n")

    obs = [torch.randn(B, H, S, D) for _ in range(3)]
    pred = [torch.randn(B, H, S, D) for _ in range(3)]
    out_o, out_p = flexebt.flex_ebt_attention(*obs, *pred, block_mask=bm0)

    # The same through the ebt_flash_attention call (frame mask of (S+1) x (S+1)).
    frame_mask = torch.tril(torch.ones(S + 1, S + 1, dtype=torch.bool))
    c_o, c_p = ebt_attention(*obs, *pred, attn_mask=frame_mask, causal=True)
    print(f"compat.ebt_attention vs flex_ebt_attention: max diff {max((c_o - out_o).abs().max(), (c_p - out_p).abs().max()):.1e}")

    # Mods see frame coordinates: ALiBi measures frame distance in both streams.
    alibi = flexebt.mods.generate_alibi_bias(H)
    out_o, out_p = flexebt.flex_ebt_attention(*obs, *pred, score_mod=alibi, block_mask=bm0)
    print(f"with ALiBi: out_o {tuple(out_o.shape)}, out_p {tuple(out_p.shape)}")
    return out_p


if __name__ == "__main__":
    main()
