// SPDX-License-Identifier: Apache-2.0
// Snippets of docs/moe.md and docs/cuda.md: a DeepSeek MoE layer with CudaBackend, whole and in
// pieces. Built with nvcc only; not run by CTest, and without a device main() only says so.
#include <cstdint>
#include <cstdio>
#include <vector>

#include "daedalus/cuda.cuh"

namespace {

using Model = daedalus::Tiny;

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("cuda_moe: no CUDA device answered\n");
    return 0;
  }
  using daedalus::DeviceMemory;
  using daedalus::index_t;
  namespace cu = daedalus::cuda;
  const daedalus::CudaBackend cuda;
  const index_t tokens = 64;
  constexpr index_t dim = Model::dim, inter = Model::moe_inter_dim;
  constexpr int E = Model::n_routed_experts, k = Model::n_activated_experts;
  auto x_buffer = cu::to_device(cuda, std::vector<float>(std::size_t(tokens * dim), 0.5f));
  cu::DeviceBuffer<float> out_buffer(std::size_t(tokens * dim));
  const auto x = x_buffer.view<2>({tokens, dim});  // device [tokens, dim]
  const auto out = out_buffer.view<2>({tokens, dim});

  // [snippet:layer]
  namespace moe = daedalus::moe;
  // The weights of the host MoeLayer<Model>::random(1), uploaded (gate fp32, experts bf16);
  // MoeLayer<Model, CudaBackend>(cuda, gate, experts, shared) takes host weight objects.
  auto layer = moe::MoeLayer<Model, daedalus::CudaBackend>::random(cuda, /*seed=*/1);
  layer.forward(cuda, x, out);  // device views; topk_ids(), logits(), plan() stay on the device
  layer.set_expert_path(moe::DeviceExpertPath::grouped_mma_permuted_read);  // or cublas_grouped

  moe::DeviceLoadStats stats(cuda, E);                       // counts and MaxVio on the device
  const moe::DeviceBiasBalancer balancer(cuda, E);           // sign rule, γ = 0.001
  layer.forward_and_balance(cuda, x, out, stats, balancer);  // no host round trip for the step
  const double vio = stats.max_vio_batch(cuda);              // one small copy, when wanted
  // [/snippet:layer]

  cu::DeviceBuffer<float> logits_buffer(std::size_t(tokens * E));
  cu::DeviceBuffer<std::int32_t> ids_buffer(std::size_t(tokens * k));
  cu::DeviceBuffer<float> weights_buffer(std::size_t(tokens * k));
  const auto logits = logits_buffer.view<2>({tokens, E});
  const auto topk_ids = ids_buffer.view<2>({tokens, k});
  const auto topk_weights = weights_buffer.view<2>({tokens, k});
  const auto gate = moe::GateWeights<Model>::random(1);
  const auto experts = moe::ExpertWeights<Model>::random(2);
  const auto shared = moe::SharedExpertWeights<Model>::random(3);
  const daedalus::TensorView<const std::int32_t, 2, DeviceMemory> ids_in = topk_ids;
  const daedalus::TensorView<const float, 2, DeviceMemory> weights_in = topk_weights;

  // [snippet:pieces]
  // The same function names as on the CPU, with device views and device weight types.
  const moe::DeviceGateWeights<Model> gate_d(cuda, gate);       // fp32 weight and bias
  moe::route(cuda, gate_d, x, logits, topk_ids, topk_weights);  // cuBLAS fp32 logits, routing
  moe::DeviceRoutingPlan plan;                                  // built on the GPU; keep it
  plan.build(cuda, ids_in, weights_in, E);
  const index_t rows = plan.rows();  // a bound known on the host: tokens·k + E·(pad_block − 1)
  cu::DeviceBuffer<float> expert_in(std::size_t(rows * dim)), hidden(std::size_t(rows * inter));
  cu::DeviceBuffer<float> expert_out(std::size_t(rows * dim));
  cu::DeviceBuffer<float> shared_hidden(
      std::size_t(tokens * moe::SharedExpertWeights<Model>::width));
  moe::dispatch(cuda, plan, x, expert_in.view<2>({rows, dim}));
  const moe::DeviceExpertWeights<Model> experts_bf16(cuda, experts);  // ExpertWeights in bf16
  moe::routed_experts(cuda, experts_bf16, plan, expert_in.view<2>({rows, dim}),
                      hidden.view<2>({rows, inter}), expert_out.view<2>({rows, dim}));
  const moe::DeviceSharedExpertWeights<Model> shared_bf16(cuda, shared);
  moe::shared_experts(cuda, shared_bf16, x,
                      shared_hidden.view<2>({tokens, moe::SharedExpertWeights<Model>::width}), out);
  moe::combine(cuda, plan, expert_out.view<2>({rows, dim}), out, moe::CombineInto::accumulate);
  // [/snippet:pieces]

  cuda.synchronize();
  std::printf("cuda_moe: MaxVio_batch %.3f, %lld plan rows\n", vio, static_cast<long long>(rows));
  return 0;
}
