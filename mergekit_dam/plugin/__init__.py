"""The mergekit plugin: the `dam` method spec and kernel (the apply path), its registration,
the pre-merge stage (the decision, its store, the training key, the launch of training),
the reading of a merge's config and inventory, and the guard around `run_merge`."""
