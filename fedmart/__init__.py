"""fedmart's composition root: the ``fedmart`` command line and one module per command family.

It is the only package that imports all the others: ``federation`` (the coordinator's side),
``clients`` (a node's side), ``privacy`` and ``serving``. Nothing imports ``fedmart``.
"""

__all__: list[str] = []
