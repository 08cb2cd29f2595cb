"""Which CUDA variant runs a problem of a given size (read by amdim_kernels/variants.py).

Written by `python benchmarks/auto_table.py RESULTS_DIR` from a GPU run of
`benchmarks/gpu_check.sh`; edit it only through that script.

MEASURED is None: no GPU run has compared the variants at this commit. The table then holds only
the defaults that were in place before the new variants (the tiled Triton forward; the CUDA C++
backward where it can be built, else the Triton row/column backward): not measured against the
dense forward or the Triton g + cuBLAS backward.
"""

MEASURED = None

# First match wins. A rule matches a problem (N rows, M = B*L columns, D, dtype) when every bound
# it names holds: "dtypes" (names), "max_nm" (N * M), "min_d", "max_d". "bwd" is an order of
# preference among the backward variants available on the machine.
RULES = [{'fwd': 'tiled', 'bwd': ['cuda', 'triton']}]
