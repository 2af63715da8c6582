"""Second order through attention: create_graph gradients and a Hessian-vector product,
checked against float64 finite differences.

    python examples/second_order.py
"""

import torch

import flexebt


def main(S: int = 12, H: int = 2, D: int = 8):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, H, S, D, dtype=torch.float64) for _ in range(3))
    bm = flexebt.create_block_mask(flexebt.masks.causal_mask, None, None, S, S, device="cpu", BLOCK_SIZE=4)
    softcap = flexebt.mods.generate_tanh_softcap(3.0)

    def energy(q):
        return flexebt.flex_attention(q, k, v, score_mod=softcap, block_mask=bm).square().sum()

    direction = torch.randn_like(q)
    # Hessian-vector product by double backward ...
    qq = q.clone().requires_grad_()
    (g,) = torch.autograd.grad(energy(qq), qq, create_graph=True)
    (hvp,) = torch.autograd.grad((g * direction).sum(), qq)
    # ... by torch.func (forward over reverse) ...
    _, hvp_func = torch.func.jvp(torch.func.grad(energy), (q,), (direction,))
    # ... and by central finite differences of the gradient.
    eps = 1e-5
    grad = torch.func.grad(energy)
    hvp_fd = (grad(q + eps * direction) - grad(q - eps * direction)) / (2 * eps)

    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    print(f"double backward vs torch.func:      {rel(hvp, hvp_func):.1e}")
    print(f"double backward vs finite diffs:    {rel(hvp, hvp_fd):.1e}")
    return rel(hvp, hvp_func), rel(hvp, hvp_fd)


if __name__ == "__main__":
    main()
