"""fedmart: serving, the third role beside the coordinator (``federation/``) and the nodes (``clients/``).

Product services run this package: it reads signed, promoted model versions from the
registry and answers recommendation and search requests over HTTP (``fedmart serve``).
It never takes part in training. Folders are named after the role that runs the code, as
in Flower (``serverapp/``, ``clientapp/``), so serving has its own rather than living in
the coordinator's. It imports ``federation`` (registry, model, catalog) and ``privacy``
(signing), never ``clients``.

One concern per module:

- ``config``    ``ServeConfig``, ``ServeError``, the inference threads
- ``schemas``   request and response bodies, their limits, the body builders
- ``items``     catalog lookups: item ids, response fields, department masks
- ``catalog_view`` the served catalog: the newest signed catalog version; training catalogs by digest
- ``served_model`` a version's item rows mapped onto the served catalog (new and removed items)
- ``snapshot``  selecting, verifying, loading and hot-swapping a version and a catalog; the fallback
- ``scoring``   the traced last-position scorer and top-k ranking of a batch
- ``batching``  the micro-batcher of concurrent requests
- ``search``    the title index and text search
- ``engine``    ``Server``: the serving core, usable without HTTP
- ``routes``    the HTTP endpoints over one ``Server``
- ``http``      the FastAPI app, error mapping, the body limit, running it under uvicorn
"""

__all__: list[str] = []
