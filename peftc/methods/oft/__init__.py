"""OFT: y = W (R x), i.e. W' = W R^T, with R = blockdiag(R_1..R_r) orthogonal, r blocks of size b
(r * b = the layer's input size; for embeddings the output rows are rotated: E' = E R).

Each block is the Cayley transform of a skew-symmetric Q_i (its b(b-1)/2 upper-triangle entries
are the trainable `oft_R.weight` row i): R_i = (I - Q_i)(I + Q_i)^-1, or by default peft's
truncated Cayley-Neumann series I + 2Q + 2Q^2 + ... + 2Q^(n-2) + Q^(n-1) with
n = num_cayley_neumann_terms (n = 3 is computed like n = 4, as peft does). `block_share` uses one
Q for all blocks; COFT projects each Q into a Frobenius ball of radius eps / sqrt(rows) before
use (in place, as peft does). Q = 0 gives R = I: the default init is an exact no-op.

Merging multiplies W by R^T block by block (several active adapters in reverse order: the input
rotated as x R_1 R_2 is the weight W R_2^T R_1^T, as peft 0.22 merges); unmerging multiplies by
(R^-1)^T computed in float64, so merge -> unmerge restores W to float32 rounding even when the
series makes R not exactly orthogonal.

Conv2d, as peft 0.22: the weight viewed as (out, C*kh*kw) is rotated, W' = W R^T, and the base
layer's own convolution (stride, padding, dilation, padding mode) runs with it; several active
adapters give W R_k^T ... R_1^T, built as merging builds it. The unmerged layer is the merged one,
for any kernel shape. A grouped Conv2d is refused at plan time: R mixes all C*kh*kw inputs of a
filter, which a grouped weight does not hold (peft 0.22 raises on it).

peft < 0.22 transformed the input instead: it cut it into k x k patches (stride 1, no padding),
rotated each patch's C*k*k values and put the patches back with F.fold, which sums where they
overlap, after a reshape that does not invert the unfold's layout; the convolution then ran on
the result. For k > 1 that map is no weight: even R = I changes the input, and 0.21's merged weight
gave other outputs than its forward. `conv_transform=patches` reproduces it step for step where it
differs from the rotation (kernels over 1 x 1, grouped convs), on the square, undilated kernels
0.21 could adapt, and refuses to merge those sites by name. A 1 x 1 ungrouped convolution has no
overlaps: both transforms are the same input rotation, which merges. Loading sets the field from
the file's peft_version (`written_before_peft_0_22`, read as peft 0.22 reads it): an adapter peft
< 0.22 trained keeps the outputs it was trained to give, its plan and load_adapter warn that peft
0.22 itself gives other outputs for it, and it is saved with peft_version 0.21.2, which reads back
the same (linear, embedding and 1 x 1 sites are the same under both: no warning, saved as 0.22).

Exactly one of r / oft_block_size is non-zero (peft's rule); a size that does not
divide a layer is refused at plan time, naming the nearest valid sizes, unless
`adjust_block_size=true` asks for peft's silent per-layer adjustment.
"""

from peftc.methods.oft import method  # noqa: F401  (registers peft=oft)
