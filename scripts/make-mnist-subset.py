#!/usr/bin/env python3
"""Writes tests/data/mnist-subset/: the first 6,000 training and 2,000 test
images of MNIST (with their labels) as IDX .gz files, for the tests of a clone
that has no full MNIST and no network. Deterministic: the same input gives the
same bytes (gzip without a name or time stamp).

Usage: scripts/make-mnist-subset.py MNIST_DIR
"""
import gzip
import os
import sys

TRAIN, TEST = 6000, 2000
OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "mnist-subset")


def read(directory, stem):
    for name, opener in ((stem + ".gz", gzip.open), (stem, open)):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            with opener(path, "rb") as f:
                return f.read()
    sys.exit(f"no {stem}(.gz) in {directory}")


def cut(data, count):
    """The first `count` items of an IDX file of unsigned bytes."""
    rank = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank)]
    item = 1
    for d in dims[1:]:
        item *= d
    header = data[:4] + count.to_bytes(4, "big") + data[8 : 4 + 4 * rank]
    body_start = 4 + 4 * rank
    return header + data[body_start : body_start + count * item]


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    os.makedirs(OUT, exist_ok=True)
    for stem, count in (
        ("train-images-idx3-ubyte", TRAIN),
        ("train-labels-idx1-ubyte", TRAIN),
        ("t10k-images-idx3-ubyte", TEST),
        ("t10k-labels-idx1-ubyte", TEST),
    ):
        subset = cut(read(sys.argv[1], stem), count)
        with open(os.path.join(OUT, stem + ".gz"), "wb") as raw:
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as f:
                f.write(subset)
        print(f"{stem}.gz: {count} items")


if __name__ == "__main__":
    main()
