"""Search logic shared by the index and evaluate stages.

- :mod:`td_ray.retrieval.faiss_index`: FAISS factory strings checked, trained once, shards added anywhere,
  IVF shards merged on disk, sharded search with each shard's top k merged;
- :mod:`td_ray.retrieval.maxp`: the passage map (faiss id -> document) and MaxP aggregation to documents;
- :mod:`td_ray.retrieval.maxsim`: ColBERT-X search by exact MaxSim over a token index;
- :mod:`td_ray.retrieval.layout`: where a built index lives and what its metadata says.
"""
