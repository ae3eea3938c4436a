"""Triton kernels. Each has a plain-torch twin elsewhere in `wan_core.ops` that mirrors its math;
tests run the kernels against the twins under TRITON_INTERPRET=1 on the CPU."""
