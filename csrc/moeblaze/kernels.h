// Host entry points of moeblaze._C (bound in module.cpp). Pointers and streams are integers
// from Python (`tensor.data_ptr()`, the current stream's handle); moeblaze/kernels/compiled.py
// checks the tensors behind them.
#pragma once

#include <cstdint>

#include "../common/device.h"

namespace moeblaze {

constexpr int kMaxPlanExperts = 1024;
constexpr int kMaxRouterExperts = 512;
constexpr int kMaxRouterTopK = 16;

// Device pointers of the plan's fields (int32, views of RoutingPlan.buffer) and its inputs.
struct PlanPointers {
  csrc::Handle topk_ids;        // [S] int32 or int64
  csrc::Handle expert_counts;   // [E]
  csrc::Handle expert_offsets;  // [E+1]
  csrc::Handle sorted_slots;    // [S]
  csrc::Handle slot_positions;  // [S]
  csrc::Handle tile_expert;     // [max_tiles]
  csrc::Handle tile_row_start;  // [max_tiles]
  csrc::Handle num_tiles;       // [1]
  csrc::Handle invalid;         // [2]
  csrc::Handle workspace;       // [plan_workspace_numel(S, E)] int32 scratch
};

// int32 elements of scratch that fill_routing_plan needs for S slots and E experts.
int64_t plan_workspace_numel(int64_t num_slots, int num_experts);

// Fill every field of a routing plan and `invalid` in one cooperative launch on `stream`.
void fill_routing_plan(const PlanPointers& pointers, bool ids_int64, int64_t workspace_numel,
                       int64_t num_slots, int num_experts, int block_m, int64_t max_tiles,
                       csrc::Handle stream, int device);

// Device pointers of the router's inputs and outputs.
struct RouterPointers {
  csrc::Handle logits;        // [N, E] float32
  csrc::Handle expert_bias;   // [E] float32, or 0 for none
  csrc::Handle topk_ids;      // [N, k] int64
  csrc::Handle topk_weights;  // [N, k] float32
  csrc::Handle scores;        // [N, E] float32
};

// Scores, group-limited top-k selection and routing weights of N rows, one warp per row.
// score_func: 0 softmax, 1 sigmoid, 2 sqrtsoftplus; num_groups = 0: no group limit.
void router_topk(const RouterPointers& pointers, int64_t num_rows, int num_experts, int top_k,
                 int score_func, int num_groups, int topk_groups, bool norm_topk_prob,
                 csrc::Handle stream, int device);

// A kernel of this module, for kernel_info()'s check that the device can load the module.
const void* plan_kernel_for_probe();

}  // namespace moeblaze
