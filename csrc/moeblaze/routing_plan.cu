// Routing plan in one cooperative launch: a stable counting sort of the S = T*k slots by expert
// and the tile metadata of the grouped GEMMs, identical to moeblaze/routing_plan.py.
//
// # T tokens, k top-k, E experts (1..1024), S = T*k slots (slot s = t*k + j), bm = block_m,
// # C chunks (one per block), W = 16 warps per block, R rounds of 32 slots per warp
//
// Outputs (int32, the fields of RoutingPlan; `_fill_plan_torch` is the readable reference):
//   expert_counts [E], expert_offsets [E+1], sorted_slots [S] (slots by expert, slot order kept
//   inside an expert), slot_positions [S] (the inverse), tile_expert / tile_row_start
//   [ceil(S/bm) + E] (tiles past num_tiles: expert E, row start S), num_tiles [1],
//   invalid [2] = (number of ids outside [0, E) other than -1, S - the lowest slot holding one;
//   0 if none). Dropped slots (id -1) and invalid ids are never used as an index and are placed
//   nowhere: expert_offsets[E] is S less their number, their slot_positions are -1, and
//   sorted_slots past expert_offsets[E] is not written.
//
// Algorithm. The slots are cut into C*W contiguous warp segments of 32*R slots; warp w of block
// c owns segment c*W + w, so (chunk, warp, round, lane) is slot order.
//   Phase 1, per block: each warp walks its rounds. `__match_any_sync` groups the lanes of a
//     round by expert and the lowest lane of each group adds the group's size to the warp's
//     row of a [W, E] shared histogram (rows are warp-private: no atomics). The block turns the
//     histogram into per-warp exclusive prefixes and writes its totals to chunk_counts [E, C].
//     Invalid ids are counted aside, with the first invalid slot, per block.
//   grid sync
//   Phase 2, one warp per expert: exclusive scan of chunk_counts[e, :] over the C <= 512 chunks
//     in place (one coalesced pass of 16 loads per lane) and expert_counts[e] = the total. One
//     more warp reduces the invalid counts and the lowest invalid slot.
//   grid sync
//   Phase 3, per block: every block reads expert_counts and scans it in shared memory (expert
//     offsets and tile ends; block 0 writes expert_offsets and num_tiles). Each warp replays its
//     rounds with the same match-any grouping: position = offsets[e] + earlier chunks + earlier
//     warps + earlier rounds + lanes below in the group, which is the stable order. The ids of
//     the first 8 rounds stay in registers across the grid syncs; later rounds are read again
//     (from L2). The blocks share the tile metadata: tile t of expert e (binary search over the
//     tile ends) starts at offsets[e] + (t - first tile of e) * bm.
// Nothing depends on timing or atomics, so the plan is bitwise the same on every run.
//
// Grid: C = min(ceil(S / 1024), 512, co-resident blocks), so every warp gets at least two
// rounds; 512 threads and (W + 2) * E * 4 bytes of shared memory per block (72 KiB at E = 1024).
//
// Predicted H100 time at T = 16384, k = 8, E = 128 (S = 131072: 128 blocks, 2 rounds per warp):
// about 6 us on the GPU. Phase 1 is one DRAM round trip for the 1 MiB of int64 ids (~1 us) plus
// a few hundred ns of match/scan; each grid sync is an arrival atomic and a poll in L2 (~1 us
// each); phase 2 is one L2 round trip and four warp scans (~0.8 us); phase 3 is one L2 round
// trip, a block scan, two replayed rounds and 1 MiB of scattered stores (~2 us). The Triton
// plan takes two launches (6-22 us measured); the old 200 us came from the host syncs of the id
// check, which this kernel replaces by the `invalid` word.
#include <cooperative_groups.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>

#include "../common/device_code.cuh"
#include "kernels.h"

namespace cg = cooperative_groups;

namespace moeblaze {
namespace {

using csrc::kFullMask;

constexpr int kWarps = 16;
constexpr int kThreads = 32 * kWarps;
constexpr int kMaxChunks = 512;                 // phase 2: 16 column loads per lane
constexpr int kMinSlotsPerChunk = kWarps * 64;  // at least two rounds of 32 slots per warp
constexpr int kCachedRounds = 8;                // rounds whose ids stay in registers
constexpr int kPastEnd = -1;                    // "expert" of a slot >= S or dropped
constexpr int kInvalid = -2;                    // "expert" of an id outside [0, E)

struct PlanArgs {
  const void* ids;      // [S] int32 or int64
  int* expert_counts;   // [E]
  int* expert_offsets;  // [E+1]
  int* sorted_slots;    // [S]
  int* slot_positions;  // [S]
  int* tile_expert;     // [max_tiles]
  int* tile_row_start;  // [max_tiles]
  int* num_tiles;       // [1]
  int* invalid;         // [2]
  int* chunk_counts;    // workspace [E, C]: counts per chunk, then their exclusive scan
  int* chunk_invalid;   // workspace [2, C]: invalid ids per chunk, first invalid slot
  int num_slots;        // S
  int num_experts;      // E
  int block_m;          // bm
  int max_tiles;        // ceil(S / bm) + E
  int slots_per_warp;   // 32 * R
};

// Expert of `slot`: its id, kInvalid for an id outside [0, E) other than -1, kPastEnd past the
// last slot and for a dropped slot (id -1): both are placed nowhere and not counted.
template <class Id>
__device__ __forceinline__ int load_expert(const Id* ids, int64_t slot, const PlanArgs& a) {
  if (slot >= a.num_slots) return kPastEnd;
  const Id id = ids[slot];
  if (id == Id{-1}) return kPastEnd;
  return (id >= 0 && id < a.num_experts) ? static_cast<int>(id) : kInvalid;
}

// The experts of kCachedRounds rounds of a warp starting at `first_slot` (this lane's slot).
template <class Id>
__device__ __forceinline__ void load_rounds(int (&experts)[kCachedRounds], const Id* ids,
                                            int64_t first_slot, int rounds, const PlanArgs& a) {
#pragma unroll
  for (int r = 0; r < kCachedRounds; ++r) {
    experts[r] = r < rounds ? load_expert(ids, first_slot + 32 * r, a) : kPastEnd;
  }
}

// One round of 32 slots of a warp. The lanes with the same expert form a group; each lane gets
// counts[e] + (lanes of its group below it), and the lowest lane of the group adds the group's
// size to counts[e]. `counts` is the warp's private row: no atomics.
__device__ __forceinline__ int take_round(int* counts, int expert) {
  const unsigned group = __match_any_sync(kFullMask, expert);
  const int below = __popc(group & csrc::lanemask_lt());
  const int base = expert >= 0 ? counts[expert] : 0;
  __syncwarp();
  if (expert >= 0 && below == 0) counts[expert] = base + __popc(group);
  __syncwarp();
  return base + below;
}

// Phase 1 on a batch of rounds: count experts, and invalid ids with the first invalid slot.
__device__ __forceinline__ void count_rounds(const int (&experts)[kCachedRounds],
                                             int64_t first_slot, int rounds, int* counts,
                                             int* invalid_count, int* invalid_first) {
#pragma unroll
  for (int r = 0; r < kCachedRounds; ++r) {
    if (r < rounds) {
      if (experts[r] == kInvalid) {
        atomicAdd(invalid_count, 1);
        atomicMin(invalid_first, static_cast<int>(first_slot + 32 * r));
      }
      take_round(counts, experts[r]);
    }
  }
}

// Phase 3 on a batch of rounds: write each valid slot to its sorted position and back; a slot
// placed nowhere gets position -1.
__device__ __forceinline__ void place_rounds(const int (&experts)[kCachedRounds],
                                             int64_t first_slot, int rounds, int* counts,
                                             const PlanArgs& a) {
#pragma unroll
  for (int r = 0; r < kCachedRounds; ++r) {
    if (r < rounds) {
      const int position = take_round(counts, experts[r]);
      const int64_t slot = first_slot + 32 * r;
      if (experts[r] >= 0) {
        a.sorted_slots[position] = static_cast<int>(slot);
        a.slot_positions[slot] = position;
      } else if (slot < a.num_slots) {
        a.slot_positions[slot] = -1;
      }
    }
  }
}

// Phase 2: exclusive scan in place of one expert's counts over the chunks; returns the total.
__device__ __forceinline__ int scan_chunk_column(int* column, int num_chunks) {
  const int lane = threadIdx.x & 31;
  int values[kMaxChunks / 32];
#pragma unroll
  for (int j = 0; j < kMaxChunks / 32; ++j) {
    const int c = 32 * j + lane;
    values[j] = c < num_chunks ? __ldcg(column + c) : 0;
  }
  int carry = 0;
#pragma unroll
  for (int j = 0; j < kMaxChunks / 32; ++j) {
    if (32 * j < num_chunks) {
      const int inclusive = csrc::warp_inclusive_sum(values[j]);
      const int c = 32 * j + lane;
      if (c < num_chunks) column[c] = carry + inclusive - values[j];
      carry += __shfl_sync(kFullMask, inclusive, 31);
    }
  }
  return carry;
}

// Phase 2: invalid[0] = number of invalid ids, invalid[1] = S - the lowest slot holding one
// (0 when there is none), the encoding of RoutingPlan.invalid_ids.
template <class Id>
__device__ __forceinline__ void reduce_invalid(const Id* ids, int num_chunks, const PlanArgs& a) {
  const int lane = threadIdx.x & 31;
  int count = 0, first = INT_MAX;
  for (int c = lane; c < num_chunks; c += 32) {
    count += __ldcg(a.chunk_invalid + c);
    first = min(first, __ldcg(a.chunk_invalid + num_chunks + c));
  }
  count = __reduce_add_sync(kFullMask, count);
  first = __reduce_min_sync(kFullMask, first);
  if (lane == 0) {
    a.invalid[0] = count;
    a.invalid[1] = count > 0 ? a.num_slots - first : 0;  // RoutingPlan.invalid_ids
  }
}

// Block-wide scan of two arrays held two elements per thread (elements 2*tid and 2*tid + 1):
// exclusive prefixes of `x`, inclusive prefixes of `y`, and both totals.
__device__ __forceinline__ void block_scan_pairs(const int (&x)[2], const int (&y)[2],
                                                 int (&x_exclusive)[2], int (&y_inclusive)[2],
                                                 int& x_total, int& y_total,
                                                 int (*warp_totals)[kWarps + 1]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int x_pair = x[0] + x[1], y_pair = y[0] + y[1];
  const int x_in_warp = csrc::warp_inclusive_sum(x_pair);
  const int y_in_warp = csrc::warp_inclusive_sum(y_pair);
  if (lane == 31) {
    warp_totals[0][warp] = x_in_warp;
    warp_totals[1][warp] = y_in_warp;
  }
  __syncthreads();
  if (warp == 0) {
    const int xw = lane < kWarps ? warp_totals[0][lane] : 0;
    const int yw = lane < kWarps ? warp_totals[1][lane] : 0;
    const int xs = csrc::warp_inclusive_sum(xw), ys = csrc::warp_inclusive_sum(yw);
    if (lane < kWarps) {
      warp_totals[0][lane] = xs - xw;
      warp_totals[1][lane] = ys - yw;
    }
    if (lane == kWarps - 1) {
      warp_totals[0][kWarps] = xs;
      warp_totals[1][kWarps] = ys;
    }
  }
  __syncthreads();
  const int x_base = warp_totals[0][warp] + x_in_warp - x_pair;
  const int y_base = warp_totals[1][warp] + y_in_warp - y_pair;
  x_exclusive[0] = x_base;
  x_exclusive[1] = x_base + x[0];
  y_inclusive[0] = y_base + y[0];
  y_inclusive[1] = y_base + y[0] + y[1];
  x_total = warp_totals[0][kWarps];
  y_total = warp_totals[1][kWarps];
}

// In: ids [S] int32 or int64. Out: expert_counts [E], expert_offsets [E+1], sorted_slots [S],
// slot_positions [S], tile_expert [max_tiles], tile_row_start [max_tiles], num_tiles [1],
// invalid [2] (all int32). Scratch: chunk_counts [E, C], chunk_invalid [2, C]. A cooperative
// launch of C blocks of 512 threads with (W + 2) * E ints of dynamic shared memory; the
// algorithm is at the top of this file.
template <class Id>
__global__ void __launch_bounds__(kThreads, 1) routing_plan_kernel(PlanArgs a) {
  extern __shared__ int shared[];
  const int E = a.num_experts;
  int* warp_counts = shared;                // [W, E] counts per warp, then next positions
  int* offsets = warp_counts + kWarps * E;  // [E] first sorted position of each expert
  int* tile_end = offsets + E;              // [E] one past the last tile of each expert
  __shared__ int warp_totals[2][kWarps + 1];
  __shared__ int invalid_count, invalid_first;

  const cg::grid_group grid = cg::this_grid();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int chunk = blockIdx.x, num_chunks = gridDim.x;
  const Id* ids = static_cast<const Id*>(a.ids);
  const int rounds = a.slots_per_warp / 32;
  const int64_t first_slot = (int64_t{chunk} * kWarps + warp) * a.slots_per_warp + lane;
  int* counts = warp_counts + warp * E;

  for (int i = threadIdx.x; i < kWarps * E; i += kThreads) warp_counts[i] = 0;
  if (threadIdx.x == 0) {
    invalid_count = 0;
    invalid_first = INT_MAX;
  }
  __syncthreads();

  // Phase 1: counts per warp, then per-warp exclusive prefixes and the chunk's totals.
  int cached[kCachedRounds];
  load_rounds(cached, ids, first_slot, rounds, a);
  count_rounds(cached, first_slot, rounds, counts, &invalid_count, &invalid_first);
  for (int r = kCachedRounds; r < rounds; r += kCachedRounds) {
    int batch[kCachedRounds];
    load_rounds(batch, ids, first_slot + 32 * r, rounds - r, a);
    count_rounds(batch, first_slot + 32 * r, rounds - r, counts, &invalid_count, &invalid_first);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += kThreads) {
    int total = 0;
    for (int w = 0; w < kWarps; ++w) {
      const int count = warp_counts[w * E + e];
      warp_counts[w * E + e] = total;
      total += count;
    }
    a.chunk_counts[int64_t{e} * num_chunks + chunk] = total;
  }
  if (threadIdx.x == 0) {
    a.chunk_invalid[chunk] = invalid_count;
    a.chunk_invalid[num_chunks + chunk] = invalid_first;
  }
  grid.sync();

  // Phase 2: scan each expert's column of chunk counts; one more task for the invalid ids.
  for (int task = chunk * kWarps + warp; task <= E; task += num_chunks * kWarps) {
    if (task < E) {
      const int total = scan_chunk_column(a.chunk_counts + int64_t{task} * num_chunks, num_chunks);
      if (lane == 0) a.expert_counts[task] = total;
    } else {
      reduce_invalid(ids, num_chunks, a);
    }
  }
  grid.sync();

  // Phase 3: expert offsets and tile ends, then every slot to its position, then the tiles.
  int count[2], before[2], tiles[2];
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    const int e = 2 * threadIdx.x + q;
    count[q] = e < E ? __ldcg(a.expert_counts + e) : 0;
    before[q] = e < E ? __ldcg(a.chunk_counts + int64_t{e} * num_chunks + chunk) : 0;
    tiles[q] = (count[q] + a.block_m - 1) / a.block_m;
  }
  int first[2], end[2], total_slots, total_tiles;
  block_scan_pairs(count, tiles, first, end, total_slots, total_tiles, warp_totals);
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    const int e = 2 * threadIdx.x + q;
    if (e < E) {
      offsets[e] = first[q];
      tile_end[e] = end[q];
      for (int w = 0; w < kWarps; ++w) warp_counts[w * E + e] += first[q] + before[q];
      if (chunk == 0) a.expert_offsets[e] = first[q];
    }
  }
  if (chunk == 0 && threadIdx.x == 0) {
    a.expert_offsets[E] = total_slots;
    a.num_tiles[0] = total_tiles;
  }
  __syncthreads();

  place_rounds(cached, first_slot, rounds, counts, a);
  for (int r = kCachedRounds; r < rounds; r += kCachedRounds) {
    int batch[kCachedRounds];
    load_rounds(batch, ids, first_slot + 32 * r, rounds - r, a);
    place_rounds(batch, first_slot + 32 * r, rounds - r, counts, a);
  }

  const int tiles_per_chunk = (a.max_tiles + num_chunks - 1) / num_chunks;
  const int tiles_stop = min(a.max_tiles, (chunk + 1) * tiles_per_chunk);
  for (int t = chunk * tiles_per_chunk + threadIdx.x; t < tiles_stop; t += kThreads) {
    int expert = E, row_start = a.num_slots;  // past the last tile
    if (t < total_tiles) {
      int low = 0, high = E - 1;  // the first expert whose tiles end after t
      while (low < high) {
        const int mid = (low + high) / 2;
        if (tile_end[mid] > t) {
          high = mid;
        } else {
          low = mid + 1;
        }
      }
      expert = low;
      const int first_tile = low > 0 ? tile_end[low - 1] : 0;
      row_start = offsets[low] + (t - first_tile) * a.block_m;
    }
    a.tile_expert[t] = expert;
    a.tile_row_start[t] = row_start;
  }
}

// Blocks of `kernel` that fit on `device` at once with `shared_bytes` of shared memory each.
// The first query per (device, kernel) also raises the kernel's dynamic shared memory limit.
int resident_blocks(const void* kernel, int shared_bytes, int device, const char* where) {
  static std::mutex mutex;
  static std::map<std::tuple<int, const void*, int>, int> cache;
  const auto key = std::make_tuple(device, kernel, shared_bytes);
  std::lock_guard<std::mutex> lock(mutex);
  const auto found = cache.find(key);
  if (found != cache.end()) return found->second;
  CSRC_CHECK_CUDA(where, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              (kWarps + 2) * kMaxPlanExperts * 4));
  int per_sm = 0;
  CSRC_CHECK_CUDA(where, cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads,
                                                                       shared_bytes));
  const int blocks = per_sm * csrc::sm_count(device, where);
  cache.emplace(key, blocks);
  return blocks;
}

int chunk_bound(int64_t num_slots) {
  const int64_t chunks = (num_slots + kMinSlotsPerChunk - 1) / kMinSlotsPerChunk;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kMaxChunks, chunks)));
}

}  // namespace

static_assert(kMaxPlanExperts == 2 * kThreads, "phase 3 scans two experts per thread");

int64_t plan_workspace_numel(int64_t num_slots, int num_experts) {
  return int64_t{num_experts + 2} * chunk_bound(num_slots);
}

const void* plan_kernel_for_probe() {
  return reinterpret_cast<const void*>(routing_plan_kernel<int>);
}

void fill_routing_plan(const PlanPointers& p, bool ids_int64, int64_t workspace_numel,
                       int64_t num_slots, int num_experts, int block_m, int64_t max_tiles,
                       csrc::Handle stream, int device) {
  const char* where = "moeblaze._C.fill_routing_plan";
  if (num_experts < 1 || num_experts > kMaxPlanExperts) {
    csrc::argument_error(where, ": num_experts=", num_experts, " must be in [1, ", kMaxPlanExperts,
                         "] (the compiled plan keeps per-warp counts of every expert in shared "
                         "memory; use the Triton plan above that)");
  }
  if (num_slots < 0 || num_slots > INT_MAX) {
    csrc::argument_error(where, ": num_slots=", num_slots, " must be in [0, 2**31 - 1]");
  }
  if (block_m < 1) csrc::argument_error(where, ": block_m=", block_m, " must be >= 1");
  if (max_tiles != (num_slots + block_m - 1) / block_m + num_experts || max_tiles > INT_MAX) {
    csrc::argument_error(where, ": max_tiles=", max_tiles, " must be ceil(num_slots / block_m) + ",
                         "num_experts = ", (num_slots + block_m - 1) / block_m + num_experts,
                         " and at most 2**31 - 1");
  }
  const int64_t needed = plan_workspace_numel(num_slots, num_experts);
  if (workspace_numel < needed) {
    csrc::argument_error(where, ": workspace has ", workspace_numel, " int32 elements, needs ",
                         needed, " (plan_workspace_numel)");
  }
  csrc::DeviceGuard guard(device, where);
  const void* kernel = ids_int64 ? reinterpret_cast<const void*>(routing_plan_kernel<int64_t>)
                                 : reinterpret_cast<const void*>(routing_plan_kernel<int>);
  const int shared_bytes = (kWarps + 2) * num_experts * 4;
  const int resident = resident_blocks(kernel, shared_bytes, device, where);
  if (resident < 1) {
    throw std::runtime_error(std::string(where) + ": the plan kernel does not fit on device " +
                             std::to_string(device) + " (no co-resident block)");
  }
  const int chunks = std::min(chunk_bound(num_slots), resident);
  const int64_t slots_per_chunk = (num_slots + chunks - 1) / chunks;
  const int64_t rounds = std::max<int64_t>(1, (slots_per_chunk + 32 * kWarps - 1) / (32 * kWarps));

  PlanArgs args{};
  args.ids = csrc::as_ptr<const void>(p.topk_ids);
  args.expert_counts = csrc::as_ptr<int>(p.expert_counts);
  args.expert_offsets = csrc::as_ptr<int>(p.expert_offsets);
  args.sorted_slots = csrc::as_ptr<int>(p.sorted_slots);
  args.slot_positions = csrc::as_ptr<int>(p.slot_positions);
  args.tile_expert = csrc::as_ptr<int>(p.tile_expert);
  args.tile_row_start = csrc::as_ptr<int>(p.tile_row_start);
  args.num_tiles = csrc::as_ptr<int>(p.num_tiles);
  args.invalid = csrc::as_ptr<int>(p.invalid);
  args.chunk_counts = csrc::as_ptr<int>(p.workspace);
  args.chunk_invalid = args.chunk_counts + int64_t{num_experts} * chunks;
  args.num_slots = static_cast<int>(num_slots);
  args.num_experts = num_experts;
  args.block_m = block_m;
  args.max_tiles = static_cast<int>(max_tiles);
  args.slots_per_warp = static_cast<int>(32 * rounds);
  void* params[] = {&args};
  CSRC_CHECK_CUDA(where, cudaLaunchCooperativeKernel(kernel, chunks, kThreads, params, shared_bytes,
                                                     csrc::as_stream(stream)));
}

}  // namespace moeblaze
