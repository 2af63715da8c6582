"""From a score_mod / mask_mod to Triton code: tracing (``trace``), derivatives (traced from
autograd), emission (``emit``), template filling and the kernel cache (``source``)."""
