// Tree causal depthwise conv1d + SiLU: every draft-tree node convolves over its own ancestors.
// Body for mx.fast.metal_kernel (launch spec: ddtree_mlx/kernels/metal.py, tree_conv1d_launch).
//
// Rows of X = concat(conv_state, x): rows 0..K-2 are the cached conv inputs (oldest first), row K-1+t is node t.
// Node t's window is its K-1 nearest ancestors (oldest first) then itself; above the root it continues into
// conv_state from its end. out[t, c] = silu(sum_i window[i, c] * weight[c, i]) with float accumulation;
// windows[t] = the window's last K-1 rows, i.e. the conv state to install if t is the last accepted node.
//
// Inputs:  x [T, C] InT; conv_state [K-1, C] (InT or float); weight [C, K] (mlx-lm's conv1d.weight [C, K, 1] has
//          the same layout; any float type); parent [T'] int32 (-1 for the root, parent[t] < t;
//          T' >= T: tables are padded to 8 entries so MLX always passes them in device memory).
// Outputs: out [T, C] InT; windows [T, K-1, C] InT.
// Template: InT, C, K.
//
// Grid (C, T, 1), threadgroup (min(C, 256), 1, 1): one thread per (channel, node). A threadgroup shares one node,
// so its ancestor walk (K-1 parent lookups) is uniform and the row loads are contiguous across channels.
// Memory per node: reads K * C inputs (ancestor rows are shared by siblings, so mostly cached) and K * C
// weights (cached); writes C outputs and (K-1) * C window entries. No cross-thread communication.
const uint c = thread_position_in_grid.x;
const int t = int(thread_position_in_grid.y);
if (c >= uint(C)) {
  return;
}

// Walk from the node up: rows[K-1] is the node itself, rows[i] its ancestor at distance K-1-i.
int rows[K];
rows[K - 1] = K - 1 + t;
for (int i = K - 2; i >= 0; --i) {
  const int r = rows[i + 1];
  if (r >= K - 1) {
    const int p = parent[r - (K - 1)];
    rows[i] = p >= 0 ? K - 1 + p : K - 2;
  } else {
    rows[i] = r - 1;
  }
}

float acc = 0.0f;
for (int i = 0; i < K; ++i) {
  const int r = rows[i];
  const float value = r >= K - 1 ? static_cast<float>(x[size_t(r - (K - 1)) * C + c])
                                 : static_cast<float>(conv_state[size_t(r) * C + c]);
  acc += value * static_cast<float>(weight[size_t(c) * K + i]);
  if (i > 0) {
    windows[(size_t(t) * (K - 1) + (i - 1)) * C + c] = static_cast<InT>(value);
  }
}
out[size_t(t) * C + c] = static_cast<InT>(acc / (1.0f + metal::exp(-acc)));
