"""Datasets, client partitioning and batch preprocessing."""

from raysage.data.datasets import DATASETS, ArrayDataset, load_dataset
from raysage.data.partition import PARTITIONERS, partition
from raysage.data.transforms import make_batch

__all__ = ["ArrayDataset", "DATASETS", "PARTITIONERS", "load_dataset", "make_batch", "partition"]
