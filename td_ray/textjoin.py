"""Text joined late: tables carry ids, and text is attached by id only where a model needs it."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from td_ray.errors import TdRayError


class MissingTextError(TdRayError):
    """Rows name ids that have no text in the table they should come from."""


def attach_text(table: pa.Table, texts: pa.Table, key: str, column: str, source: str, fix: str) -> pa.Table:
    """`table` with `texts` (id, text) joined on `key` as `column`; fails naming ids that have no text."""
    joined = table.join(texts.select(["id", "text"]).rename_columns([key, column]), key, join_type="left outer")
    lacking = joined.filter(pc.is_null(joined[column]))
    if lacking.num_rows:
        raise MissingTextError(
            f"{lacking.num_rows} row(s) name a {key} with no text in the {source}, e.g. "
            f"{lacking[key].slice(0, 3).to_pylist()}; {fix}"
        )
    return joined
