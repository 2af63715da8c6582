"""Independent float64 formulas the tests compare flexebt against.

Written differently from flexebt's reference on purpose: mods are evaluated element by element
on scalar index tensors (the FlexAttention calling convention), the softmax is torch.softmax
over an explicitly built candidate list, and the EBT layout is spelled out per query.
Small sizes only.
"""

from __future__ import annotations

import torch

def _scalar(i):
    return torch.tensor(i, dtype=torch.int64)  # torch's eager flex_attention passes int64 positions


def score_table(q, k, score_mod, scale, q_frames, kv_frames, mask_mod=None):
    """Per (b, h): lists of (modded score, kept) for every q row and kv column."""
    B, H = q.shape[:2]
    out = []
    for b in range(B):
        for h in range(H):
            rows = []
            for i, fi in enumerate(q_frames):
                row = []
                for j, fj in enumerate(kv_frames):
                    s = scale * torch.dot(q[b, h, i], k[b, h, j])
                    if score_mod is not None:
                        s = score_mod(s, _scalar(b), _scalar(h), _scalar(fi), _scalar(fj))
                    keep = True if mask_mod is None else bool(mask_mod(_scalar(b), _scalar(h), _scalar(fi), _scalar(fj)))
                    row.append((s, keep))
                rows.append(row)
            out.append(rows)
    return out


def softmax_rows(cands, values):
    """cands: list of (score, keep); values: list of vectors.  Returns (out, lse) for one row."""
    kept = [(s, v) for (s, keep), v in zip(cands, values) if keep]
    if not kept:
        return torch.zeros_like(values[0]), torch.tensor(float("-inf"), dtype=values[0].dtype)
    s = torch.stack([x[0] for x in kept])
    p = torch.softmax(s, dim=0)
    return (p[:, None] * torch.stack([x[1] for x in kept])).sum(0), torch.logsumexp(s, dim=0)


def gqa(x, H):
    return x.repeat_interleave(H // x.shape[1], dim=1)


def attention_oracle(q, k, v, score_mod=None, mask_mod=None, scale=None):
    """Plain attention over [B, H, S, D] with mods evaluated per element (no block sparsity)."""
    q, k, v = q.double(), gqa(k.double(), q.shape[1]), gqa(v.double(), q.shape[1])
    B, H, Sq, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    table = score_table(q, k, score_mod, scale, range(Sq), range(k.shape[2]), mask_mod)
    outs, lses = [], []
    for bh, rows in enumerate(table):
        b, h = divmod(bh, H)
        for row in rows:
            o, l = softmax_rows(row, list(v[b, h]))
            outs.append(o)
            lses.append(l)
    return torch.stack(outs).view(B, H, Sq, -1), torch.stack(lses).view(B, H, Sq)


def ebt_oracle(q_o, k_o, v_o, q_p, k_p, v_p, score_mod=None, mask_mod=None, scale=None):
    """EBT two-stream attention spelled out per query: observed rows over observed keys;
    predicted row i at frame t = i + r + 1 over observed keys j != t plus its own key at frame t."""
    H = q_o.shape[1]
    q_o, q_p = q_o.double(), q_p.double()
    k_o, v_o, k_p, v_p = (gqa(x.double(), H) for x in (k_o, v_o, k_p, v_p))
    B, _, So, D = q_o.shape
    Sp = q_p.shape[2]
    r = So - Sp
    scale = D ** -0.5 if scale is None else scale

    def cand(b, h, q, fq, k, fk):
        s = scale * torch.dot(q, k)
        if score_mod is not None:
            s = score_mod(s, _scalar(b), _scalar(h), _scalar(fq), _scalar(fk))
        keep = True if mask_mod is None else bool(mask_mod(_scalar(b), _scalar(h), _scalar(fq), _scalar(fk)))
        return s, keep

    out_o, lse_o, out_p, lse_p = [], [], [], []
    for b in range(B):
        for h in range(H):
            for j2 in range(So):
                o, l = softmax_rows([cand(b, h, q_o[b, h, j2], j2, k_o[b, h, j], j) for j in range(So)],
                                    list(v_o[b, h]))
                out_o.append(o)
                lse_o.append(l)
            for i in range(Sp):
                t = i + r + 1
                cands = [cand(b, h, q_p[b, h, i], t, k_o[b, h, j], j) for j in range(So) if j != t]
                vals = [v_o[b, h, j] for j in range(So) if j != t]
                cands.append(cand(b, h, q_p[b, h, i], t, k_p[b, h, i], t))
                vals.append(v_p[b, h, i])
                o, l = softmax_rows(cands, vals)
                out_p.append(o)
                lse_p.append(l)
    Dv = v_o.shape[-1]
    return (torch.stack(out_o).view(B, H, So, Dv), torch.stack(out_p).view(B, H, Sp, Dv),
            torch.stack(lse_o).view(B, H, So), torch.stack(lse_p).view(B, H, Sp))


def piecewise_oracle(q1, k1, q2, k2, v, w, causal=False, scale=None):
    q1, k1, q2, k2, v = (x.double() for x in (q1, k1, q2, k2, v))
    B, H, M, D = q1.shape
    N = k1.shape[2]
    P = N - M
    scale = D ** -0.5 if scale is None else scale
    outs = []
    for b in range(B):
        for h in range(H):
            for m in range(M):
                cands = []
                for n in range(N):
                    dist = P + m - n
                    qa, ka = (q2, k2) if dist >= w else (q1, k1)
                    cands.append((scale * torch.dot(qa[b, h, m], ka[b, h, n]), (not causal) or n <= P + m))
                outs.append(softmax_rows(cands, list(v[b, h]))[0])
    return torch.stack(outs).view(B, H, M, -1)


def ebt_slicing_formula(q_o, k_o, v_o, q_p, k_p, v_p, frame_mask):
    """The EBT reference code's way (ar_ebt_default for r = 0, ar_ebt_time_embed for r = 1),
    re-derived for any r: the observed stream uses the frame mask cut to ``[:-1, :-1]``; the
    predicted stream scores its queries against the observed keys plus a zero column, overwrites
    the superdiagonal at offset r + 1 with the own-key score, adds ``frame_mask[r + 1:, :]``, takes
    one softmax, then splits the superdiagonal weight off onto ``v_p``.

    frame_mask: additive ``(S_o + 1) x (S_o + 1)`` (0 / -inf).  Exact for causal masks only (the
    formula lets the spare column leak probability mass otherwise).
    """
    q_o, k_o, v_o, q_p, k_p, v_p = (x.double() for x in (q_o, k_o, v_o, q_p, k_p, v_p))
    So, Sp, D = q_o.shape[2], q_p.shape[2], q_o.shape[-1]
    r = So - Sp
    sc = D ** -0.5
    s_o = q_o @ k_o.transpose(-1, -2) * sc + frame_mask[:-1, :-1]
    out_o = torch.softmax(s_o, -1) @ v_o
    s_p = q_p @ k_o.transpose(-1, -2) * sc
    s_p = torch.cat([s_p, torch.zeros_like(s_p[..., :1])], dim=-1)        # [.., Sp, So + 1]
    rows, cols = torch.arange(Sp), torch.arange(r + 1, So + 1)
    own = (q_p * k_p).sum(-1) * sc
    on_diag = torch.zeros_like(s_p, dtype=torch.bool)
    on_diag[..., rows, cols] = True
    s_p = torch.where(on_diag, own.unsqueeze(-1).expand_as(s_p), s_p) + frame_mask[r + 1:, :]
    p = torch.softmax(s_p, -1)
    self_w = p.diagonal(offset=r + 1, dim1=-2, dim2=-1)
    out_p = torch.where(on_diag, torch.zeros_like(p), p)[..., :-1] @ v_o + self_w.unsqueeze(-1) * v_p
    return out_o, out_p
