"""The weights fingerprint shared by llmc and its OpenCompass model classes (torch only)."""

from __future__ import annotations


def weights_fingerprint(model) -> str:
    """sha256 over ``model.state_dict()`` (names, dtypes, shapes, raw bytes) in name order.

    llmc computes it on the in-memory model whose perplexity it reported; the OpenCompass model
    classes in :mod:`llmc_oc_compat` compute it on what they loaded and log it, and llmc compares
    the two, so "the evaluated weights are the fake-quant weights" is checked on every run.
    """
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
