// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <new>
#include <random>
#include <string_view>
#include <type_traits>
#include <vector>

#include "daedalus/config/concepts.hpp"
#include "daedalus/core/backend.hpp"
#include "daedalus/core/error.hpp"
#include "daedalus/core/tensor_view.hpp"
#include "daedalus/core/traits.hpp"

/// The DeepSeek Mixture-of-Experts gate (router): which k routed experts each token goes to, and
/// with what weight. Semantics of DeepSeek-V3's reference `Gate.forward` (inference/model.py) and
/// the DeepSeek-V3 report, section 2.1.2, eqs. 12-16:
///
///  1. logits = x · Wᵀ (W: [n_routed_experts, dim], DeepSeek's [out, in] layout), in fp32;
///     scores s = softmax(logits) (V2, V2-Lite) or sigmoid(logits) (V3), in fp32.
///  2. With a selection bias b (V3's `e_score_correction_bias`): selection scores s + b (or s · b
///     with BiasMode::multiplicative). The bias only chooses experts; weights come from s.
///  3. With n_expert_groups > 1: each group's score is the max of its selection scores (no bias)
///     or the sum of its top two (with a bias); only the n_limited_groups best groups stay
///     eligible, the others are masked to -inf (never 0: with biases drifting negative a 0 fill
///     would let a masked expert win).
///  4. The k experts with the largest selection scores among the eligible ones, in order of
///     decreasing selection score. Ties: the lower expert id first (and, for groups, the lower
///     group id first). The rule is exact, so results do not depend on threads or data layout.
///  5. weights = s at the chosen experts; divided by their sum when `normalize` (V3; the sum gets
///     1e-20 added, as HF's modeling_deepseek does, so an all-underflowed row gives 0, not NaN);
///     then multiplied by route_scale.
///
/// The front validates every argument, then hands the work to `detail::GateImpl<Backend>`, which
/// each backend folder specialises (`moe/cpu/gate.hpp`).
namespace daedalus::moe {

/// How a selection bias combines with the scores when choosing experts.
enum class BiasMode {
  /// s + b: DeepSeek-V3 (report, eq. 16) and the loss-free balancing paper's default.
  additive,
  /// s · b, b starting at 1: the multiplicative variant the loss-free balancing paper compares
  /// against (arXiv 2408.15664, section 5). Meant for positive scores (sigmoid, softmax).
  multiplicative,
};

namespace detail {

/// `C::norm_topk_prob` when the config names one (HF's field), else true exactly for sigmoid
/// gates: DeepSeek-V3's reference renormalises the selected weights iff score_func is sigmoid.
template <MoeConfig C>
constexpr bool config_normalizes() {
  if constexpr (requires {
                  { C::norm_topk_prob } -> std::convertible_to<bool>;
                }) {
    return C::norm_topk_prob;
  } else {
    return C::score_func == ScoreFunc::sigmoid;
  }
}

/// `C::has_selection_bias` when the config names one, else true exactly for sigmoid gates
/// (DeepSeek-V3 has `e_score_correction_bias`; V2 and V2-Lite have none).
template <MoeConfig C>
constexpr bool config_has_selection_bias() {
  if constexpr (requires {
                  { C::has_selection_bias } -> std::convertible_to<bool>;
                }) {
    return C::has_selection_bias;
  } else {
    return C::score_func == ScoreFunc::sigmoid;
  }
}

}  // namespace detail

/// Everything the routing after the logits depends on. Runtime values, so one compiled kernel
/// serves every model; `from_config<C>()` gives a preset's.
struct GateSettings {
  ScoreFunc score_func = ScoreFunc::softmax;
  int n_routed_experts = 0;  ///< E
  int n_expert_groups = 1;   ///< G; E must be a multiple of G
  int n_limited_groups = 1;  ///< groups a token may use, in [1, G]
  int topk = 0;              ///< k = n_activated_experts, at most n_limited_groups · E / G
  bool normalize = false;    ///< divide the k selected weights by their sum
  double route_scale = 1.0;  ///< final factor on the weights
  BiasMode bias_mode = BiasMode::additive;

  /// The settings of config `C`: its score function, experts, groups, k and route_scale;
  /// normalize = `C::norm_topk_prob` if present, else (score_func == sigmoid).
  template <MoeConfig C>
  static constexpr GateSettings from_config() {
    GateSettings s;
    s.score_func = C::score_func;
    s.n_routed_experts = C::n_routed_experts;
    s.n_expert_groups = C::n_expert_groups;
    s.n_limited_groups = C::n_limited_groups;
    s.topk = C::n_activated_experts;
    s.normalize = detail::config_normalizes<C>();
    s.route_scale = C::route_scale;
    return s;
  }

  [[nodiscard]] int experts_per_group() const {
    return n_expert_groups > 0 ? n_routed_experts / n_expert_groups : 0;
  }

  /// @throws InvalidArgument naming `function` and the offending field when the settings are
  ///         inconsistent (k larger than the experts the group limit leaves, ...).
  void validate(std::string_view function) const {
    using daedalus::detail::require;
    require<InvalidArgument>(n_routed_experts >= 1, function, ": 'n_routed_experts' is ",
                             n_routed_experts, "; expected at least 1");
    require<InvalidArgument>(
        n_expert_groups >= 1 && n_routed_experts % n_expert_groups == 0, function,
        ": 'n_expert_groups' is ", n_expert_groups,
        "; expected a positive divisor of n_routed_experts = ", n_routed_experts);
    require<InvalidArgument>(n_limited_groups >= 1 && n_limited_groups <= n_expert_groups, function,
                             ": 'n_limited_groups' is ", n_limited_groups,
                             "; expected a value in [1, n_expert_groups = ", n_expert_groups, "]");
    const int eligible = n_limited_groups * experts_per_group();
    require<InvalidArgument>(topk >= 1 && topk <= eligible, function, ": 'topk' is ", topk,
                             "; expected a value in [1, ", eligible,
                             "] (n_limited_groups · experts per group)");
    require<InvalidArgument>(std::isfinite(route_scale) && route_scale > 0.0, function,
                             ": 'route_scale' is ", route_scale,
                             "; expected a positive finite number");
  }
};

namespace detail {

/// Experts per panel of a packed gate weight (GateWeights::packed_weight): 4 zmm of fp32.
inline constexpr index_t kGatePanel = 64;

/// Storage aligned to a cache line (64 bytes), so that every 64-float row of a packed panel is
/// one line and one aligned 512-bit load per 16 floats.
template <class T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <class U>
  explicit CacheLineAllocator(const CacheLineAllocator<U>&) noexcept {}
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new (n * sizeof(T), std::align_val_t{64}));
  }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete (p, std::align_val_t{64}); }
  friend bool operator==(const CacheLineAllocator&, const CacheLineAllocator&) { return true; }
};

/// The gate weight W [experts, dim] as panels of kGatePanel experts, depth-major:
/// packed[p][d][j] = W[64p + j][d], zero for experts past E. The layout the CPU gate GEMM streams
/// (moe/cpu/gate_gemm.hpp): a panel row is one x value's 64 products.
inline void pack_gate_panels(const float* w, index_t experts, index_t dim, float* packed) {
  const index_t panels = (experts + kGatePanel - 1) / kGatePanel;
  for (index_t p = 0; p < panels; ++p) {
    float* panel = packed + p * dim * kGatePanel;
    for (index_t j = 0; j < kGatePanel; ++j) {
      const index_t e = p * kGatePanel + j;
      if (e < experts) {
        for (index_t d = 0; d < dim; ++d) panel[d * kGatePanel + j] = w[e * dim + d];
      } else {
        for (index_t d = 0; d < dim; ++d) panel[d * kGatePanel + j] = 0.0f;
      }
    }
  }
}

}  // namespace detail

/// The gate's parameters for config `C`: the weight [n_routed_experts, dim] (DeepSeek's
/// `gate.weight`, [out, in]) and, when the config has one, the selection bias [n_routed_experts]
/// (`e_score_correction_bias`, fp32). The bias is mutable: a BiasBalancer updates it.
///
/// The weight is also kept packed (`packed_weight`, the layout of detail::pack_gate_panels), so
/// that a gate call only streams it: packing 7.3 MB on every call (DeepSeek-V3) costs more than
/// the GEMM at small batches. The copy is made when the weight is set (construction,
/// `set_weight`), never lazily, so concurrent const use (several threads routing through one
/// gate) reads only; it doubles the gate's memory (2 × E × dim × 4 bytes).
template <MoeConfig C>
class GateWeights {
 public:
  static constexpr int experts = C::n_routed_experts;
  static constexpr int dim = C::dim;
  static constexpr bool has_bias_by_default = detail::config_has_selection_bias<C>();
  static constexpr index_t panels = (experts + detail::kGatePanel - 1) / detail::kGatePanel;

  /// Zero weight; a zero bias (BiasMode::additive's neutral value) when the config has one.
  GateWeights()
      : weight_(std::size_t(experts) * dim, 0.0f),
        packed_(std::size_t(panels * dim * detail::kGatePanel), 0.0f),
        bias_(has_bias_by_default ? std::size_t(experts) : 0, 0.0f) {}

  /// Copies a weight [experts, dim] and a bias [experts], or no bias (an empty view).
  /// @throws InvalidArgument for wrong extents; NumericError for a non-finite value.
  static GateWeights from_arrays(HostView<const float, 2> weight, HostView<const float, 1> bias) {
    constexpr std::string_view fn = "daedalus::moe::GateWeights::from_arrays";
    check_weight(fn, weight);
    if (bias.extent(0) != 0) daedalus::detail::check_extents(fn, "bias", bias, {experts});
    for (index_t i = 0; i < bias.extent(0); ++i) {
      daedalus::detail::require<NumericError>(std::isfinite(bias.data()[i]), fn,
                                              ": 'bias' holds a non-finite value at expert ", i);
    }
    GateWeights g;
    g.weight_.assign(weight.data(), weight.data() + weight.size());
    g.bias_.assign(bias.data(), bias.data() + bias.extent(0));
    g.repack();
    return g;
  }

  /// Random weights uniform in ±1/√dim (nn.Linear's init scale, so logits are O(1)) and, when
  /// the config has a bias, a bias uniform in ±0.05, from a seeded stream.
  static GateWeights random(std::uint64_t seed) {
    GateWeights g;
    std::mt19937_64 rng(seed);
    const double scale = 1.0 / std::sqrt(double(dim));
    for (float& w : g.weight_) w = float((double(rng() >> 11) * 0x1p-53 * 2.0 - 1.0) * scale);
    for (float& b : g.bias_) b = float((double(rng() >> 11) * 0x1p-53 * 2.0 - 1.0) * 0.05);
    g.repack();
    return g;
  }

  /// Replaces the weight [experts, dim] (and its packed copy); the bias is kept.
  /// @throws InvalidArgument for wrong extents; NumericError for a non-finite value. On a throw
  ///         the gate is unchanged.
  void set_weight(HostView<const float, 2> weight) {
    check_weight("daedalus::moe::GateWeights::set_weight", weight);
    std::vector<float> w(weight.data(), weight.data() + weight.size());
    PackedStorage packed(packed_.size());
    detail::pack_gate_panels(w.data(), experts, dim, packed.data());
    weight_.swap(w);
    packed_.swap(packed);
  }

  /// [experts, dim], read-only: change it with set_weight, which keeps the packed copy in step.
  [[nodiscard]] HostView<const float, 2> weight() const { return {weight_.data(), {experts, dim}}; }
  /// The weight as `panels` panels of [dim, 64] (detail::pack_gate_panels), viewed as
  /// [panels · dim, 64]; 64-byte aligned.
  [[nodiscard]] HostView<const float, 2> packed_weight() const {
    return {packed_.data(), {panels * dim, detail::kGatePanel}};
  }
  [[nodiscard]] bool has_bias() const { return !bias_.empty(); }
  /// [experts], or extent 0 when the gate has no selection bias.
  [[nodiscard]] HostView<const float, 1> bias() const {
    return {bias_.data(), {index_t(bias_.size())}};
  }
  [[nodiscard]] HostView<float, 1> bias() { return {bias_.data(), {index_t(bias_.size())}}; }

  /// Adds a selection bias of zeros (or removes it), e.g. to balance a V2-style softmax gate.
  void set_has_bias(bool on) { bias_.assign(on ? std::size_t(experts) : 0, 0.0f); }

 private:
  using PackedStorage = std::vector<float, detail::CacheLineAllocator<float>>;

  static void check_weight(std::string_view fn, const HostView<const float, 2>& weight) {
    daedalus::detail::check_extents(fn, "weight", weight, {experts, dim});
    for (index_t i = 0; i < weight.size(); ++i) {
      daedalus::detail::require<NumericError>(std::isfinite(weight.data()[i]), fn,
                                              ": 'weight' holds a non-finite value at expert ",
                                              i / dim, ", column ", i % dim);
    }
  }

  void repack() { detail::pack_gate_panels(weight_.data(), experts, dim, packed_.data()); }

  std::vector<float> weight_;  // [experts, dim]
  PackedStorage packed_;       // [panels][dim][64], weight_ packed
  std::vector<float> bias_;    // [experts] or empty
};

namespace detail {

/// The backend's gate kernels. Backends specialise it in their own folder; the primary template
/// only explains what is missing.
template <class Backend>
struct GateImpl {
  static_assert(daedalus::detail::dependent_false<Backend>,
                "daedalus::moe: no gate implementation for this backend is visible: include "
                "<daedalus/daedalus.hpp> (or <daedalus/moe/cpu/gate.hpp>) for CpuBackend");
};

template <class Backend, class View>
constexpr void gate_require_host_view() {
  static_assert(std::is_same_v<typename View::memory_space, typename Backend::memory_space>,
                "daedalus::moe: a view argument lives in a memory space this backend cannot "
                "read (e.g. a DeviceMemory view passed with CpuBackend)");
}

template <class Space>
void check_gate_outputs(std::string_view fn, const GateSettings& settings, index_t tokens,
                        const TensorView<std::int32_t, 2, Space>& topk_ids,
                        const TensorView<float, 2, Space>& topk_weights) {
  daedalus::detail::check_extents(fn, "topk_ids", topk_ids, {tokens, index_t(settings.topk)});
  daedalus::detail::check_extents(fn, "topk_weights", topk_weights,
                                  {tokens, index_t(settings.topk)});
}

/// The bias: empty, or one value per expert; host biases must also be finite (a device bias is
/// checked by the device backend, next to the logits).
template <class Space>
void check_bias(std::string_view fn, const GateSettings& settings,
                const TensorView<const float, 1, Space>& bias) {
  if (bias.extent(0) == 0) return;
  daedalus::detail::check_extents(fn, "bias", bias, {index_t(settings.n_routed_experts)});
  if constexpr (std::is_same_v<Space, HostMemory>) {
    for (index_t e = 0; e < bias.extent(0); ++e) {
      daedalus::detail::require<NumericError>(std::isfinite(bias.data()[e]), fn,
                                              ": 'bias' holds a non-finite value (", bias.data()[e],
                                              ") at expert ", e, "; expected finite biases");
    }
  }
}

/// The checks `moe::route` makes on every backend, in this order: the settings, their expert
/// count against C's, x [tokens, dim], the gate's bias and the outputs [tokens, topk].
template <MoeConfig C, class Space>
void check_route_arguments(std::string_view fn, const GateSettings& settings,
                           const TensorView<const float, 1, Space>& bias,
                           const TensorView<const float, 2, Space>& x,
                           const TensorView<std::int32_t, 2, Space>& topk_ids,
                           const TensorView<float, 2, Space>& topk_weights) {
  settings.validate(fn);
  daedalus::detail::require<InvalidArgument>(
      settings.n_routed_experts == C::n_routed_experts, fn, ": 'settings.n_routed_experts' is ",
      settings.n_routed_experts, "; expected ", C::n_routed_experts, " (", config_name<C>(), ")");
  const index_t tokens = x.extent(0);
  daedalus::detail::check_extents(fn, "x", x, {tokens, index_t(C::dim)});
  check_bias(fn, settings, bias);
  check_gate_outputs(fn, settings, tokens, topk_ids, topk_weights);
}

}  // namespace detail

/// Routes a batch from precomputed fp32 logits (for engines that run the gate GEMM themselves).
///
/// @param settings     score function, groups, k, normalisation, route scale (validated)
/// The views live in the backend's memory space (host views with CpuBackend, device views with
/// CudaBackend, whose check of the logits costs one 8-byte copy and a stream synchronisation).
///
/// @param logits       [tokens, n_routed_experts] fp32; must be finite
/// @param bias         [n_routed_experts] selection bias, or an empty view for none
/// @param topk_ids     [tokens, topk] out: expert ids, decreasing selection score, ties → lower id
/// @param topk_weights [tokens, topk] out: final weights (normalised if set, × route_scale)
/// @throws InvalidArgument for inconsistent settings or extents; NumericError for a non-finite
///         bias (naming the expert) or logit (naming the token). On a throw the outputs are
///         unchanged.
template <class Backend>
void route_logits(const Backend& backend, const GateSettings& settings,
                  TensorView<const float, 2, typename Backend::memory_space> logits,
                  TensorView<const float, 1, typename Backend::memory_space> bias,
                  TensorView<std::int32_t, 2, typename Backend::memory_space> topk_ids,
                  TensorView<float, 2, typename Backend::memory_space> topk_weights) {
  constexpr std::string_view fn = "daedalus::moe::route_logits";
  settings.validate(fn);
  const index_t tokens = logits.extent(0);
  daedalus::detail::check_extents(fn, "logits", logits,
                                  {tokens, index_t(settings.n_routed_experts)});
  detail::check_bias(fn, settings, bias);
  detail::check_gate_outputs(fn, settings, tokens, topk_ids, topk_weights);
  detail::GateImpl<Backend>::route_logits(backend, settings, logits, bias, topk_ids, topk_weights);
}

/// The whole gate of config `C` on a batch: logits = x · Wᵀ (threaded over the backend), then
/// the routing of `route_logits` with the gate's bias (if any).
///
/// @param x            [tokens, dim] fp32 activations; must be finite
/// @param topk_ids     [tokens, n_activated_experts] out
/// @param topk_weights [tokens, n_activated_experts] out
/// @param settings     defaults to GateSettings::from_config<C>()
/// @throws InvalidArgument for wrong extents; NumericError naming the token whose logits are
///         not finite (a NaN or infinite x). On a throw the outputs are unchanged.
template <class Backend, MoeConfig C>
void route(const Backend& backend, const GateWeights<C>& gate, HostView<const float, 2> x,
           HostView<std::int32_t, 2> topk_ids, HostView<float, 2> topk_weights,
           const GateSettings& settings = GateSettings::from_config<C>()) {
  constexpr std::string_view fn = "daedalus::moe::route";
  detail::gate_require_host_view<Backend, HostView<const float, 2>>();
  detail::check_route_arguments<C>(fn, settings, gate.bias(), x, topk_ids, topk_weights);
  detail::GateImpl<Backend>::route(backend, settings, gate.weight(), gate.packed_weight(),
                                   gate.bias(), x, topk_ids, topk_weights);
}

/// The unbiased scores of a batch: softmax or sigmoid of the logits, in fp32 (what the
/// sequence-wise balance loss and the auxiliary loss read). The views live in the backend's
/// memory space; both backends compute the scores with the same operations as the gate
/// (core/math.hpp's exp_f32 and sigmoid_f32, the softmax sum in warp order), so they agree bit
/// for bit.
/// @param logits [tokens, experts]; @param scores [tokens, experts] out (may alias logits' data)
/// @throws InvalidArgument for mismatched extents; NumericError naming the first token with a
///         non-finite logit (scores unchanged).
template <class Backend>
void compute_scores(const Backend& backend, ScoreFunc score_func,
                    TensorView<const float, 2, typename Backend::memory_space> logits,
                    TensorView<float, 2, typename Backend::memory_space> scores) {
  constexpr std::string_view fn = "daedalus::moe::compute_scores";
  daedalus::detail::check_extents(fn, "logits", logits, {logits.extent(0), logits.extent(1)});
  daedalus::detail::check_extents(fn, "scores", scores, {logits.extent(0), logits.extent(1)});
  detail::GateImpl<Backend>::compute_scores(backend, score_func, logits, scores);
}

}  // namespace daedalus::moe
