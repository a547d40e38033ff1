// overlap._C: chunk signals for the overlap protocol (see signals.cu). Python calls these
// through overlap/kernels/compiled.py, which checks the tensors and passes their addresses.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "../common/module_info.h"
#include "signals.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "overlap compiled kernels: set and wait on 32-bit chunk flags from a stream";
  csrc::add_kernel_info(m, "overlap._C", overlap::signal_kernel_for_probe());
  m.def("stream_memops", &overlap::stream_memops,
        "(available, reason): whether the driver provides cuStreamWriteValue32 and "
        "cuStreamWaitValue32 (looked up once per process).");
  m.def("write_flag", &overlap::write_flag, py::arg("flag"), py::arg("value"), py::arg("stream"),
        py::arg("device"),
        "*flag = value (int32) after the stream's earlier work: a stream memory write, or a "
        "one-thread kernel without driver support. Returns True for the stream memory write.");
  m.def("write_flag_with_kernel", &overlap::write_flag_with_kernel, py::arg("flag"),
        py::arg("value"), py::arg("stream"), py::arg("device"),
        "*flag = value with the one-thread kernel (release store at system scope).");
  m.def("wait_flag", &overlap::wait_flag, py::arg("flag"), py::arg("value"), py::arg("stream"),
        py::arg("device"),
        "The stream's later work waits until (int32)(*flag - value) >= 0 (cuStreamWaitValue32, "
        "CU_STREAM_WAIT_VALUE_GEQ; no SM).");
  m.def("wait_flag_bounded", &overlap::wait_flag_bounded, py::arg("flag"), py::arg("value"),
        py::arg("status"), py::arg("timeout_ns"), py::arg("code"), py::arg("stream"),
        py::arg("device"),
        "A one-thread kernel waits until (int32)(*flag - value) >= 0 for at most timeout_ns of "
        "real time; on a timeout status[0:2] = (code, observed flag), first timeout wins.");
}
