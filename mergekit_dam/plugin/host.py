"""Every use of mergekit internals (names it does not export as API) goes through here,
so that a mergekit upgrade touches one file."""

from __future__ import annotations


def tensor_loader(model):
    """mergekit's cached lazy tensor loader for a ModelReference (`.get_tensor`, `.index`)."""
    from mergekit.io.tasks import LoaderCache

    return LoaderCache().get(model)
