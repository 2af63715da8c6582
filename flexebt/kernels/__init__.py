"""Triton kernel templates (``templates/``, one per family, filled by ``flexebt.codegen``), their
launchers (``flex``, ``ebt``) and the tile configurations (``configs``)."""
