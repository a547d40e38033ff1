#include "device.h"

#include <atomic>

namespace csrc {

int sm_count(int device, const char* where) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices] = {};  // 0: not queried yet
  if (device < 0 || device >= kMaxDevices) argument_error(where, ": device index ", device, " is out of range");
  int count = cached[device].load(std::memory_order_relaxed);
  if (count == 0) {
    CSRC_CHECK_CUDA(where, cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    cached[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

}  // namespace csrc
