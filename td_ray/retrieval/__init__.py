"""Search logic shared by the index and evaluate stages.

- :mod:`td_ray.retrieval.faiss_index`: FAISS factory strings checked, trained once, shards added anywhere,
  IVF shards merged on disk, sharded search with each shard's top k merged;
- :mod:`td_ray.retrieval.maxp`: the passage map (faiss id -> document) and MaxP aggregation to documents;
- :mod:`td_ray.retrieval.maxsim`: exact MaxSim, and the exhaustive search that is the ColBERT oracle;
- :mod:`td_ray.retrieval.plaid`: ColBERT-X's compressed token index (PLAID-style): codec, on-disk layout, search;
- :mod:`td_ray.retrieval.layout`: where a built index lives and what its metadata says.
"""
