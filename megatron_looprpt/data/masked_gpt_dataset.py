"""megatron-core's GPTDataset, with the loss masks of prompt/completion documents.

Where a loss mask (``datasets.loss_mask_prefix``) lies beside a dataset's tokens, each sample's
mask is read with the sample's own document and offset mapping (GPTDataset's, applied to the
mask dataset: both have the same document lengths) and multiplied into ``loss_mask``. Datasets
without a mask behave exactly as GPTDataset.
"""

from __future__ import annotations

import os
from typing import Dict, Optional

import numpy
import torch
from megatron.core.datasets.gpt_dataset import GPTDataset
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_looprpt.data.datasets import loss_mask_prefix


def open_loss_mask(dataset_path: Optional[str], tokens: IndexedDataset) -> Optional[IndexedDataset]:
    """The loss-mask dataset beside ``dataset_path``, or None; it must match the tokens'
    document lengths."""
    if dataset_path is None:
        return None
    prefix = loss_mask_prefix(dataset_path)
    if not os.path.exists(prefix + ".idx"):
        return None
    mask = IndexedDataset(prefix)
    if not numpy.array_equal(mask.sequence_lengths, tokens.sequence_lengths):
        raise ValueError(f"--data-path {dataset_path}: its loss mask {prefix} has other document lengths "
                         "than its tokens; write both again with tools/preprocess_data.py --prompt-key")
    return mask


class MaskedGPTDataset(GPTDataset):
    def __init__(self, indexed_dataset, dataset_path, *args, **kwargs) -> None:
        super().__init__(indexed_dataset, dataset_path, *args, **kwargs)
        self.loss_mask_dataset = open_loss_mask(dataset_path, indexed_dataset)

    def __getitem__(self, idx: Optional[int]) -> Dict[str, torch.Tensor]:
        item = super().__getitem__(idx)
        if self.loss_mask_dataset is None or idx is None:
            return item
        # GPTDataset reads ``self.dataset``; pointing it at the mask for one query reuses its
        # document/offset mapping instead of a copy of it.
        tokens, self.dataset = self.dataset, self.loss_mask_dataset
        try:
            # the sample's ids come first; what follows differs by release (0.19 adds document lengths)
            mask = self._query_document_sample_shuffle_indices(idx)[0]
        finally:
            self.dataset = tokens
        counted = torch.from_numpy(mask == 1)
        # loss_mask[i] weighs the prediction of labels[i], i.e. of the sequence's token i + 1
        counted = counted[1:] if self.config.add_extra_token_to_sequence else torch.roll(counted, -1)
        item["loss_mask"] = item["loss_mask"] * counted.to(item["loss_mask"].dtype)
        return item
