// moeblaze._C: the routing plan and the router top-k (routing_plan.cu, router_topk.cu). Python
// calls these through moeblaze/kernels/compiled.py, which checks the tensors and passes their
// addresses and the current stream.
#include <pybind11/pybind11.h>

#include "../common/module_info.h"
#include "kernels.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "moeblaze compiled kernels: routing plan and router top-k";
  csrc::add_kernel_info(m, "moeblaze._C", moeblaze::plan_kernel_for_probe());
  m.attr("MAX_PLAN_EXPERTS") = moeblaze::kMaxPlanExperts;
  m.attr("MAX_ROUTER_EXPERTS") = moeblaze::kMaxRouterExperts;
  m.attr("MAX_ROUTER_TOPK") = moeblaze::kMaxRouterTopK;
  m.def("plan_workspace_numel", &moeblaze::plan_workspace_numel, py::arg("num_slots"),
        py::arg("num_experts"), "int32 elements of scratch fill_routing_plan needs.");
  m.def(
      "fill_routing_plan",
      [](csrc::Handle topk_ids, bool ids_int64, csrc::Handle expert_counts,
         csrc::Handle expert_offsets, csrc::Handle sorted_slots, csrc::Handle slot_positions,
         csrc::Handle tile_expert, csrc::Handle tile_row_start, csrc::Handle num_tiles,
         csrc::Handle invalid, csrc::Handle workspace, int64_t workspace_numel, int64_t num_slots,
         int num_experts, int block_m, int64_t max_tiles, csrc::Handle stream, int device) {
        const moeblaze::PlanPointers pointers{
            topk_ids,    expert_counts,  expert_offsets, sorted_slots, slot_positions,
            tile_expert, tile_row_start, num_tiles,      invalid,      workspace};
        moeblaze::fill_routing_plan(pointers, ids_int64, workspace_numel, num_slots, num_experts,
                                    block_m, max_tiles, stream, device);
      },
      py::arg("topk_ids"), py::arg("ids_int64"), py::arg("expert_counts"),
      py::arg("expert_offsets"), py::arg("sorted_slots"), py::arg("slot_positions"),
      py::arg("tile_expert"), py::arg("tile_row_start"), py::arg("num_tiles"), py::arg("invalid"),
      py::arg("workspace"), py::arg("workspace_numel"), py::arg("num_slots"),
      py::arg("num_experts"), py::arg("block_m"), py::arg("max_tiles"), py::arg("stream"),
      py::arg("device"),
      "Fill a routing plan's fields and invalid[2] in one cooperative launch (device addresses).");
  m.def(
      "router_topk",
      [](csrc::Handle logits, csrc::Handle expert_bias, csrc::Handle topk_ids,
         csrc::Handle topk_weights, csrc::Handle scores, int64_t num_rows, int num_experts,
         int top_k, int score_func, int num_groups, int topk_groups, bool norm_topk_prob,
         csrc::Handle stream, int device) {
        const moeblaze::RouterPointers pointers{logits, expert_bias, topk_ids, topk_weights,
                                                scores};
        moeblaze::router_topk(pointers, num_rows, num_experts, top_k, score_func, num_groups,
                              topk_groups, norm_topk_prob, stream, device);
      },
      py::arg("logits"), py::arg("expert_bias"), py::arg("topk_ids"), py::arg("topk_weights"),
      py::arg("scores"), py::arg("num_rows"), py::arg("num_experts"), py::arg("top_k"),
      py::arg("score_func"), py::arg("num_groups"), py::arg("topk_groups"),
      py::arg("norm_topk_prob"), py::arg("stream"), py::arg("device"),
      "Scores, top-k ids and weights of every row (device addresses; score_func 0 softmax, 1 "
      "sigmoid, 2 sqrtsoftplus; num_groups 0: no group limit).");
}
