// Router top-k: score function, expert bias, group-limited selection, top-k and the routing
// weights of every token in one launch, with the semantics of moeblaze.router.Router.forward
// (the torch oracle is router_topk_reference in moeblaze/kernels/compiled.py).
//
// # N tokens (rows), E experts (<= 512), k top-k (<= 16), G expert groups of E/G experts
//
// Inputs:  logits [N, E] float32, expert_bias [E] float32 (optional).
// Outputs: topk_ids [N, k] int64 (best first), topk_weights [N, k] float32, scores [N, E]
//          float32 (softmax, sigmoid or sqrt(softplus) of the logits: what the backward needs).
//
// Algorithm: one warp per row, lane l holding experts l, l + 32, l + 64, ... in registers (VPT
// = ceil(E/32) rounded up to 1, 2, 4, 8, 12 or 16 per lane), the layout of PyTorch's warp
// softmax, whose max, exp, lane-serial sum, butterfly sum and division it repeats so the scores
// match torch.softmax bit for bit on the GPU.
//   1. scores: softmax (warp max, exp, warp sum, divide), sigmoid 1 / (1 + exp(-x)) or
//      sqrt(softplus(x)), softplus as torch's: x above 20, else log1p(exp(x)).
//   2. selection keys: float_key(score + bias), an int32 with the order of the floats.
//   3. groups (when topk_groups < G): the warp writes its keys to shared memory; P lanes per
//      group (the largest power of two with P * G <= 32) scan a group each for its top-2 keys
//      and merge them with shuffles; group score = top-1 (softmax) or top-1 + top-2 in float
//      (sigmoid, sqrtsoftplus; top-1 alone for one-expert groups). topk_groups rounds of warp
//      arg-max keep the best groups; the keys of the other experts become the key of -inf.
//   4. top-k: k rounds of arg-max over the keys: each lane's best key, `__reduce_max_sync`
//      over the warp, then `__reduce_min_sync` of the expert index among the lanes that hold
//      that key, so ties go to the lower expert index (also for groups). The winner's key is
//      retired; lane r keeps the r-th id and its unbiased score.
//   5. weights: the chosen scores, divided by (their sum + 1e-20) when normalised.
// Ties: equal selection keys (score + bias) go to the lower expert index, equal group scores to
// the lower group index: the order of a stable descending sort. -0.0 equals +0.0; NaN sorts
// above +inf (as in torch.sort).
//
// Predicted H100 time at N = 16384, E = 128, k = 8 (VPT = 4): about 8 us. Memory: 8 MiB of
// logits in and 8 MiB of scores out, ~5.5 us at 3 TB/s; issue: ~400 warp instructions per row
// (the eight arg-max rounds are ~35 each), 6.6M in all, ~7 us at 4 warp instructions per cycle
// per SM on 132 SMs; the two overlap.
#include <cmath>

#include "../common/device_code.cuh"
#include "kernels.h"

namespace moeblaze {
namespace {

using csrc::float_key;
using csrc::key_float;
using csrc::kFullMask;
using csrc::kNoKey;

constexpr int kRouterWarps = 8;  // rows per block
// Score functions, numbered as the launcher's score_func argument.
constexpr int kSoftmax = 0, kSigmoid = 1, kSqrtSoftplus = 2;
constexpr int kRouterThreads = 32 * kRouterWarps;

struct RouterArgs {
  const float* logits;       // [N, E]
  const float* expert_bias;  // [E] or nullptr
  int64_t* topk_ids;         // [N, k]
  float* topk_weights;       // [N, k]
  float* scores;             // [N, E]
  int64_t num_rows;          // N
  int num_experts;           // E
  int top_k;                 // k
  int score_func;            // kSoftmax, kSigmoid or kSqrtSoftplus
  bool normalize;            // divide the weights by their sum + 1e-20
  bool grouped;              // group limit in effect (topk_groups < num_groups)
  int num_groups;            // G
  int topk_groups;           // groups kept
  int group_size;            // E / G
  int lanes_per_group;       // P: a power of two, P * G <= 32 (1 when G > 32)
  float inv_group_size;      // 1 / (E / G)
};

// Keep the experts of the best `topk_groups` groups: the others' keys become the key of -inf.
// `keys_smem` and `groups_smem` are this warp's [32 * VPT] ints of shared memory.
template <int VPT>
__device__ __forceinline__ void mask_groups(int (&key)[VPT], int* keys_smem, int* groups_smem,
                                            const RouterArgs& a) {
  const int lane = threadIdx.x & 31;
  const int G = a.num_groups, size = a.group_size, P = a.lanes_per_group;
#pragma unroll
  for (int i = 0; i < VPT; ++i) keys_smem[32 * i + lane] = key[i];
  __syncwarp();

  // Top-2 keys of each group: P lanes per group, a pass covers 32 / P groups.
  for (int pass = 0; pass * (32 / P) < G; ++pass) {
    const int g = pass * (32 / P) + lane / P, part = lane % P;
    int top1 = kNoKey, top2 = kNoKey;
    if (g < G) {
      for (int j = part; j < size; j += P) {
        const int k = keys_smem[g * size + j];
        if (k > top1) {
          top2 = top1;
          top1 = k;
        } else if (k > top2) {
          top2 = k;
        }
      }
    }
    for (int offset = 1; offset < P; offset <<= 1) {
      const int other1 = __shfl_xor_sync(kFullMask, top1, offset);
      const int other2 = __shfl_xor_sync(kFullMask, top2, offset);
      top2 = max(min(top1, other1), max(top2, other2));
      top1 = max(top1, other1);
    }
    if (g < G && part == 0) {
      const bool sum_two = a.score_func != kSoftmax && size > 1;
      groups_smem[g] = sum_two ? float_key(key_float(top1) + key_float(top2)) : top1;
    }
  }
  __syncwarp();

  // Keep the best topk_groups groups (ties: lower group index); kept ones are marked kNoKey.
  for (int round = 0; round < a.topk_groups; ++round) {
    int best = kNoKey, best_group = INT_MAX;
    for (int g = lane; g < G; g += 32) {
      const int k = groups_smem[g];
      if (k > best) {
        best = k;
        best_group = g;
      }
    }
    const int top = __reduce_max_sync(kFullMask, best);
    const int winner = __reduce_min_sync(kFullMask, best == top ? best_group : INT_MAX);
    __syncwarp();
    if (lane == 0) groups_smem[winner] = kNoKey;
    __syncwarp();
  }

  const int minus_inf = float_key(-INFINITY);
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int e = 32 * i + lane;
    if (e < a.num_experts) {
      const int g = static_cast<int>((e + 0.5f) * a.inv_group_size);  // exact: e < 512
      if (groups_smem[g] != kNoKey) key[i] = minus_inf;
    }
  }
}

// In: logits [N, E] float32, expert_bias [E] float32 or null. Out: topk_ids [N, k] int64,
// topk_weights [N, k] float32, scores [N, E] float32. Blocks of 8 warps, one row per warp, VPT
// experts per lane; with groups, 2 * 32 * VPT ints of dynamic shared memory per warp. The
// algorithm is at the top of this file.
template <int VPT>
__global__ void __launch_bounds__(kRouterThreads) router_topk_kernel(RouterArgs a) {
  extern __shared__ int shared[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t row = int64_t{blockIdx.x} * kRouterWarps + warp;
  if (row >= a.num_rows) return;  // the whole warp
  const int E = a.num_experts;
  const float* logits = a.logits + row * E;

  float score[VPT];
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int e = 32 * i + lane;
    score[i] = e < E ? logits[e] : -INFINITY;
  }
  if (a.score_func == kSigmoid) {
#pragma unroll
    for (int i = 0; i < VPT; ++i) score[i] = 1.0f / (1.0f + expf(-score[i]));
  } else if (a.score_func == kSqrtSoftplus) {  // torch.nn.functional.softplus, then sqrt
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      score[i] = sqrtf(score[i] > 20.0f ? score[i] : log1pf(expf(score[i])));
    }
  } else {
    float top = score[0];
#pragma unroll
    for (int i = 1; i < VPT; ++i) top = top > score[i] ? top : score[i];
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      const float other = __shfl_xor_sync(kFullMask, top, offset);
      top = top > other ? top : other;
    }
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      score[i] = expf(score[i] - top);
      sum += score[i];
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(kFullMask, sum, offset);
#pragma unroll
    for (int i = 0; i < VPT; ++i) score[i] = score[i] / sum;
  }

  int key[VPT];
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int e = 32 * i + lane;
    const float choice = a.expert_bias != nullptr && e < E ? score[i] + a.expert_bias[e] : score[i];
    key[i] = e < E ? float_key(choice) : kNoKey;
  }
  if (a.grouped) {
    int* keys_smem = shared + warp * 2 * 32 * VPT;
    mask_groups<VPT>(key, keys_smem, keys_smem + 32 * VPT, a);
  }

  int64_t my_id = 0;
  float my_weight = 0.0f;
  for (int r = 0; r < a.top_k; ++r) {
    int best = kNoKey, best_slot = 0;
    float best_score = 0.0f;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      if (key[i] > best) {
        best = key[i];
        best_slot = i;
        best_score = score[i];
      }
    }
    const int top = __reduce_max_sync(kFullMask, best);
    const int expert = __reduce_min_sync(kFullMask, best == top ? 32 * best_slot + lane : INT_MAX);
    const float weight = __shfl_sync(kFullMask, best_score, expert & 31);
#pragma unroll
    for (int i = 0; i < VPT; ++i) key[i] = 32 * i + lane == expert ? kNoKey : key[i];
    if (lane == r) {
      my_id = expert;
      my_weight = weight;
    }
  }

  if (a.normalize) {
    float sum = lane < a.top_k ? my_weight : 0.0f;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(kFullMask, sum, offset);
    my_weight = my_weight / (sum + 1e-20f);
  }
  if (lane < a.top_k) {
    a.topk_ids[row * a.top_k + lane] = my_id;
    a.topk_weights[row * a.top_k + lane] = my_weight;
  }
  float* scores = a.scores + row * E;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int e = 32 * i + lane;
    if (e < E) scores[e] = score[i];
  }
}

template <int VPT>
void launch_router(const RouterArgs& args, cudaStream_t stream, const char* where) {
  const int64_t blocks = (args.num_rows + kRouterWarps - 1) / kRouterWarps;
  const int shared_bytes = args.grouped ? kRouterWarps * 2 * 32 * VPT * 4 : 0;
  router_topk_kernel<VPT>
      <<<static_cast<unsigned>(blocks), kRouterThreads, shared_bytes, stream>>>(args);
  CSRC_CHECK_CUDA(where, cudaGetLastError());
}

}  // namespace

void router_topk(const RouterPointers& p, int64_t num_rows, int num_experts, int top_k,
                 int score_func, int num_groups, int topk_groups, bool norm_topk_prob,
                 csrc::Handle stream, int device) {
  const char* where = "moeblaze._C.router_topk";
  if (num_experts < 1 || num_experts > kMaxRouterExperts) {
    csrc::argument_error(where, ": num_experts=", num_experts, " must be in [1, ",
                         kMaxRouterExperts, "]");
  }
  if (top_k < 1 || top_k > std::min(num_experts, kMaxRouterTopK)) {
    csrc::argument_error(where, ": top_k=", top_k, " must be in [1, min(num_experts, ",
                         kMaxRouterTopK, ") = ", std::min(num_experts, kMaxRouterTopK), "]");
  }
  if (score_func != kSoftmax && score_func != kSigmoid && score_func != kSqrtSoftplus) {
    csrc::argument_error(where, ": score_func=", score_func,
                         " must be 0 (softmax), 1 (sigmoid) or 2 (sqrtsoftplus)");
  }
  if (num_rows < 0 || num_rows > (int64_t{1} << 31) * kRouterWarps) {
    csrc::argument_error(where, ": num_rows=", num_rows, " is out of range");
  }
  if (num_groups != 0) {
    if (num_groups < 1 || num_experts % num_groups != 0) {
      csrc::argument_error(where, ": num_groups=", num_groups,
                           " must divide num_experts=", num_experts);
    }
    if (topk_groups < 1 || topk_groups > num_groups) {
      csrc::argument_error(where, ": topk_groups=", topk_groups,
                           " must be in [1, num_groups=", num_groups, "]");
    }
    if (top_k > topk_groups * (num_experts / num_groups)) {
      csrc::argument_error(where, ": top_k=", top_k, " must be <= topk_groups * num_experts / ",
                           "num_groups = ", topk_groups * (num_experts / num_groups));
    }
  }
  if (num_rows == 0) return;

  RouterArgs args{};
  args.logits = csrc::as_ptr<const float>(p.logits);
  args.expert_bias = csrc::as_ptr<const float>(p.expert_bias);
  args.topk_ids = csrc::as_ptr<int64_t>(p.topk_ids);
  args.topk_weights = csrc::as_ptr<float>(p.topk_weights);
  args.scores = csrc::as_ptr<float>(p.scores);
  args.num_rows = num_rows;
  args.num_experts = num_experts;
  args.top_k = top_k;
  args.score_func = score_func;
  args.normalize = norm_topk_prob;
  args.grouped = num_groups != 0 && topk_groups < num_groups;
  args.num_groups = num_groups;
  args.topk_groups = topk_groups;
  args.group_size = num_groups != 0 ? num_experts / num_groups : num_experts;
  args.lanes_per_group = 1;
  while (num_groups != 0 && args.lanes_per_group * 2 * num_groups <= 32) args.lanes_per_group *= 2;
  args.inv_group_size = 1.0f / static_cast<float>(args.group_size);

  csrc::DeviceGuard guard(device, where);
  const cudaStream_t s = csrc::as_stream(stream);
  if (num_experts <= 32) {
    launch_router<1>(args, s, where);
  } else if (num_experts <= 64) {
    launch_router<2>(args, s, where);
  } else if (num_experts <= 128) {
    launch_router<4>(args, s, where);
  } else if (num_experts <= 256) {
    launch_router<8>(args, s, where);
  } else if (num_experts <= 384) {
    launch_router<12>(args, s, where);
  } else {
    launch_router<16>(args, s, where);
  }
}

}  // namespace moeblaze
