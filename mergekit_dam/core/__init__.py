"""The shared floor: what the plugin, the training engine and the tools all stand on, and
which imports nothing above it. Settings and errors, dataset and artifact paths, the
coefficient artifact with the files beside it, the parametrizations, the resolver of every
`auto` setting, the merge kernels (plain and fused) and atomic writes."""
