"""Datasets, client partitioning, local batches and batch preprocessing."""

from raysage.data.batches import batch_sizes, client_batch, num_batches
from raysage.data.datasets import DATASETS, ArrayDataset, SyntheticImages, load_dataset
from raysage.data.partition import PARTITIONERS, partition
from raysage.data.transforms import make_batch

__all__ = ["ArrayDataset", "DATASETS", "PARTITIONERS", "SyntheticImages", "batch_sizes",
           "client_batch", "load_dataset", "make_batch", "num_batches", "partition"]
