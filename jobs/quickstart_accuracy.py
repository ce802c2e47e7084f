"""Print how often the quickstart's predictions match the labels, per split."""

from __future__ import annotations

import sys

import pyarrow.compute as pc
import pyarrow.dataset as ds


def main(output: str = "out/digits") -> None:
    table = ds.dataset(output, format="parquet").to_table(columns=["split", "label", "predicted"])
    for split in sorted(set(table.column("split").to_pylist())):
        part = table.filter(pc.equal(table["split"], split))
        hits = pc.sum(pc.equal(part["label"], part["predicted"])).as_py()
        print(f"{split:>5}: {hits}/{part.num_rows} correct, accuracy {hits / part.num_rows:.3f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
