"""The mergekit plugin: settings, the `dam` method spec and kernel, the pre-merge stage,
the inventory of a merge's inputs, the coefficient artifact and the apply kernel."""
