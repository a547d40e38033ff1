// Device helpers shared by the kernels: PTX memory operations at system scope, the global
// nanosecond timer, lane masks, warp sums and an order-preserving integer key for floats.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

namespace csrc {

constexpr unsigned kFullMask = 0xffffffffu;

// Load with acquire semantics at system scope: sees what a peer GPU, the host or a stream
// memory operation released before raising the value.
__device__ __forceinline__ int load_acquire_sys(const int* address) {
  int value;
  asm volatile("ld.acquire.sys.global.s32 %0, [%1];" : "=r"(value) : "l"(address) : "memory");
  return value;
}

// Store with release semantics at system scope.
__device__ __forceinline__ void store_release_sys(int* address, int value) {
  asm volatile("st.release.sys.global.s32 [%0], %1;" ::"l"(address), "r"(value) : "memory");
}

// Nanoseconds of the GPU's global timer (one clock for every SM; wall time, not cycles).
__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t ns;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
  return ns;
}

// Bits of the lanes below this one.
__device__ __forceinline__ unsigned lanemask_lt() {
  unsigned mask;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(mask));
  return mask;
}

// Inclusive prefix sum over the 32 lanes of a warp.
__device__ __forceinline__ int warp_inclusive_sum(int value) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int other = __shfl_up_sync(kFullMask, value, offset);
    if (lane >= offset) value += other;
  }
  return value;
}

// A signed integer whose order is the order of the floats: -inf < ... < -0 = +0 < ... < +inf <
// NaN. -0.0 maps to the key of +0.0 and every NaN to the key of the canonical +NaN, so equal
// floats have equal keys and NaN sorts first in a descending order, as in torch.sort.
// INT_MIN is the key of no float: the kernels use it for "taken" or "absent".
__device__ __forceinline__ int float_key(float value) {
  int bits = __float_as_int(value);
  if (value == 0.0f) bits = 0;
  if (value != value) bits = 0x7fc00000;
  return bits >= 0 ? bits : bits ^ 0x7fffffff;
}

__device__ __forceinline__ float key_float(int key) {
  return __int_as_float(key >= 0 ? key : key ^ 0x7fffffff);
}

constexpr int kNoKey = INT_MIN;

}  // namespace csrc
