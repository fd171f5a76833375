// Tree gated-delta recurrence: every draft-tree node forks the GatedDeltaNet state from its parent.
// Body for mx.fast.metal_kernel (launch spec: ddtree_mlx/kernels/metal.py, tree_gated_delta_launch).
//
// Per node t and value head hv (hk = hv / (Hv / Hk)), with S_p the parent's state (state_in for the root):
//   S = g[t,hv] * S_p;  delta = (v[t,hv] - S k[t,hk]) * beta[t,hv];  S_t = S + delta k^T;  y[t,hv] = S_t q[t,hk]
// exactly the step of mlx-lm's gated_delta kernel (float32 state math, same lane split, same two simd_sums).
//
// Inputs:  q, k [T, Hk, Dk] InT; v [T, Hv, Dv] InT; g, beta [T, Hv] (float or InT); state_in [Hv, Dv, Dk] float;
//          parent [T] int32 (-1 = state_in, parent[t] < t); order [T] int32 (node ids sorted by depth, any order
//          within a depth); level_start [n_levels + 1] int32 (depth d is order[level_start[d] : level_start[d+1]]);
//          state_row [T] int32 (the scratch row holding node t's state; see below); n_levels int scalar. The int32
//          tables are padded to at least 8 entries (read only up to T and n_levels), so MLX always passes them in
//          device memory: one compiled library per template, whatever the tree's size.
// Outputs: y [T, Hv, Dv] InT; delta_out [T, Hv, Dv] float (each node's delta: with k and the decays it rebuilds any
//          node's state in closed form, so the commit needs no stored state); scratch [R, Hv, Dv, Dk] float.
// Template: InT, Dk (a multiple of 32), Dv, Hk, Hv.
//
// Grid (32, NS, Hv * Dv), threadgroup (32, NS, 4 / NS), 128 threads (NS = 1, 2 or 4 node slots, for the widest
// level): thread_position_in_grid.z is one value row (hv, dv) and the NS simdgroups that share it are node slots. Levels are walked in order; within a level, slot s takes the
// level's nodes s, s + NS, ...: same-depth nodes run in parallel, across slots and across all rows at once.
// A simdgroup keeps its row's Dk state elements in registers (Dk / 32 per lane, contiguous) and reloads them
// from scratch[state_row[parent]] only when the parent is not the node it computed last (chains stay in registers).
// A parent's row may have been written by another slot of the same threadgroup one level earlier, hence the
// device-memory threadgroup barrier after each level (skipped when NS == 1: the slot then wrote it itself).
// Control flow is uniform per simdgroup (the node loop depends only on the slot), as simd_sum requires.
//
// Scratch: a level only reads the states of the level above it, so the host assigns rows level by level,
// alternating between two halves of the widest level's size (R = 2 * widest level, or T when that is fewer):
// a level overwrites rows last read one level earlier, behind the barrier. The scratch is dead once the kernel
// ends; only y and delta_out (Dv floats per node and head, not Dv * Dk) outlive it.
//
// Memory per node and row: writes Dk floats of state to scratch, one y and one delta; reads Dk floats of parent
// state unless held in registers, and q/k (shared by all Dv rows of a head, so cached), one v, g and beta.
constexpr int n_per_t = Dk / 32;
const uint lane = thread_index_in_simdgroup;
const uint slot = thread_position_in_threadgroup.y;
const uint n_slots = threads_per_threadgroup.y;
const uint row = thread_position_in_grid.z;
const uint hv = row / Dv;
const uint dv = row % Dv;
const uint hk = hv / (Hv / Hk);
const uint first = n_per_t * lane;

float state[n_per_t];
int held = -2;  // the node whose state is in registers (-1: state_in, -2: none)
for (int level = 0; level < n_levels; ++level) {
  for (int i = level_start[level] + int(slot); i < level_start[level + 1]; i += int(n_slots)) {
    const int t = order[i];
    const int p = parent[t];
    if (p != held) {
      const device float* src = p < 0 ? state_in + size_t(row) * Dk
                                      : scratch + (size_t(state_row[p]) * Hv * Dv + row) * Dk;
      for (int j = 0; j < n_per_t; ++j) {
        state[j] = src[first + j];
      }
    }
    const auto q_ = q + (size_t(t) * Hk + hk) * Dk + first;
    const auto k_ = k + (size_t(t) * Hk + hk) * Dk + first;
    const float g_t = static_cast<float>(g[t * Hv + hv]);
    const float beta_t = static_cast<float>(beta[t * Hv + hv]);

    float kv_mem = 0.0f;
    for (int j = 0; j < n_per_t; ++j) {
      state[j] = state[j] * g_t;
      kv_mem += state[j] * static_cast<float>(k_[j]);
    }
    kv_mem = simd_sum(kv_mem);

    const float delta = (static_cast<float>(v[(size_t(t) * Hv + hv) * Dv + dv]) - kv_mem) * beta_t;

    float out = 0.0f;
    for (int j = 0; j < n_per_t; ++j) {
      state[j] = state[j] + static_cast<float>(k_[j]) * delta;
      out += state[j] * static_cast<float>(q_[j]);
    }
    out = simd_sum(out);
    if (lane == 0) {
      y[(size_t(t) * Hv + hv) * Dv + dv] = static_cast<InT>(out);
      delta_out[(size_t(t) * Hv + hv) * Dv + dv] = delta;
    }
    device float* dst = scratch + (size_t(state_row[t]) * Hv * Dv + row) * Dk;
    for (int j = 0; j < n_per_t; ++j) {
      dst[first + j] = state[j];
    }
    held = t;
  }
  if (n_slots > 1) {
    threadgroup_barrier(mem_flags::mem_device);
  }
}
