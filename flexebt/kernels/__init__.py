"""Triton kernel templates (``templates/``: one file per pass family and ``common.py``, filled by
``flexebt.codegen``), the kernels' declared signatures (``signatures``), their launchers (``flex``,
``ebt``) and the tile configurations (``configs``)."""
