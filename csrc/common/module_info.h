// kernel_info(): what a compiled module was built for and whether this process can run it.
#pragma once

#include <pybind11/pybind11.h>

namespace csrc {

// Adds `kernel_info() -> dict` to `module`. `probe_kernel` is one of the module's kernels: the
// module is usable when the current device can load it (an image for its architecture exists).
void add_kernel_info(pybind11::module_& module, const char* module_name, const void* probe_kernel);

}  // namespace csrc
