import torch


def rel_err(x, ref):
    """||x - ref|| / ||ref|| in float64 (the error metric of the tolerance rule); inf if x has NaN."""
    x, ref = x.double(), ref.double()
    if torch.isnan(x).any():
        return float("inf")
    finite = torch.isfinite(ref)
    if not torch.equal(finite, torch.isfinite(x)) or not torch.equal(x[~finite], ref[~finite]):
        return float("inf")
    x, ref = x[finite], ref[finite]
    denom = ref.norm()
    return ((x - ref).norm() / denom).item() if denom > 0 else (x - ref).norm().item()


def rand(*shape, dtype=torch.float64, requires_grad=True):
    return torch.randn(*shape, dtype=dtype).requires_grad_(requires_grad)


def grads(outputs, inputs, cotangents=None, create_graph=False):
    """First-order gradients of sum(out * cotangent) w.r.t. inputs (None-safe)."""
    if cotangents is None:
        cotangents = [torch.randn_like(o) for o in outputs]
    total = sum((o * c).sum() for o, c in zip(outputs, cotangents))
    return torch.autograd.grad(total, inputs, create_graph=create_graph, allow_unused=True)


def second_order(fn, inputs, seed=1):
    """EBT-style: energy -> grads with create_graph -> a loss on the grads -> grads of all inputs.

    Returns the first-order grads and the second-order grads (both lists), so two
    implementations can be compared term by term.
    """
    g = torch.Generator().manual_seed(seed)
    outs = fn(*inputs)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    cts = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
    first = torch.autograd.grad(sum((o * c).sum() for o, c in zip(outs, cts)), inputs, create_graph=True,
                                allow_unused=True)
    first = [torch.zeros_like(i) if f is None else f for f, i in zip(first, inputs)]  # unused input: 0
    w = [torch.randn(x.shape, generator=g, dtype=x.dtype) for x in first]
    loss = sum((x * wi).sum() + 0.5 * (x ** 2).sum() for x, wi in zip(first, w))
    second = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [x.detach() for x in first], [torch.zeros_like(i) if s is None else s for s, i in zip(second, inputs)]


def large_logit_orders(fn, x64, dtype):
    """Output, first- and second-order gradients of ``fn(q, k, v)`` in ``dtype`` from float64 inputs
    ``x64`` (fixed cotangents; the second-order loss mixes a projection and a square of each first
    gradient)."""
    g = torch.Generator(device=x64[0].device).manual_seed(0)
    x = [t.to(dtype).requires_grad_() for t in x64]
    out = fn(*x)
    ct = torch.randn(out.shape, generator=g, dtype=torch.float64, device=out.device).to(dtype)
    first = torch.autograd.grad((out * ct).sum(), x, create_graph=True)
    w = [torch.randn(f.shape, generator=g, dtype=torch.float64, device=f.device).to(dtype) for f in first]
    second = torch.autograd.grad(sum((f * wi).sum() + 0.5 * (f * f).sum() for f, wi in zip(first, w)), x)
    return [out] + list(first) + list(second)


def ulp_of_largest_logit(q, k, scale):
    """One fp32 ulp of the largest |q k^T| * scale: how far a score rebuilt in another summation order
    (k q^T) may be from the forward's, and so the floor of a gradient's relative error there."""
    import math

    logits = (q @ k.transpose(-1, -2)).abs().max().item() * scale
    return 2.0 ** (math.floor(math.log2(logits)) - 23)
