// SPDX-License-Identifier: Apache-2.0
#pragma once

// An independent double-precision reference of DeepSeek's MoE gate and of the balancing
// quantities, written from the DeepSeek-V3 report (arXiv 2412.19437, section 2.1.2, and
// arXiv 2408.15664 for the selection bias) and DeepSeek-V3's inference/model.py (`Gate.forward`),
// not from daedalus: it includes no daedalus header, takes plain row-major arrays and a runtime
// struct, and follows the torch code literally: dropped groups are filled with -inf, the top-k is a
// full sort, everything is in double.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

namespace moe_gate_reference {

struct Settings {
  bool sigmoid;  // else softmax
  int experts;
  int groups;
  int limited_groups;
  int k;
  bool normalize;
  double route_scale;
  bool multiplicative_bias;  // selection = s · b instead of s + b
};

struct Result {
  std::vector<std::int32_t> ids;  // [T, k]
  std::vector<double> weights;    // [T, k]
  /// Per token, the smallest gap between two values whose order decided the result (group
  /// scores at the group cut, selection scores at the top-k cut and between chosen experts):
  /// a computation with errors below half of it must reproduce the ids exactly.
  std::vector<double> margin;  // [T]
  /// Per token, which groups stayed eligible (1) or were dropped (0): [T, groups].
  std::vector<char> group_kept;
  /// Per token, the largest score and the largest |selection score|.
  std::vector<double> max_score, max_selection;
};

/// logits [T, E] = x [T, dim] · wᵀ (w [E, dim]) in double.
inline std::vector<double> logits(const std::vector<float>& x, const std::vector<float>& w,
                                  int tokens, int dim, int experts) {
  std::vector<double> out(std::size_t(tokens) * experts);
  for (int t = 0; t < tokens; ++t)
    for (int e = 0; e < experts; ++e) {
      double acc = 0.0;
      for (int d = 0; d < dim; ++d)
        acc += double(x[std::size_t(t) * dim + d]) * double(w[std::size_t(e) * dim + d]);
      out[std::size_t(t) * experts + e] = acc;
    }
  return out;
}

/// Per token, max_e ‖(x_d · w_{e,d})_d‖₂: with random-signed terms a dim-long fp32 dot product's
/// partial sums grow like √dim times the terms' rms, and so do their rounding errors, so its error
/// is of order u · √dim · this norm.
inline std::vector<double> dot_term_norms(const std::vector<float>& x, const std::vector<float>& w,
                                          int tokens, int dim, int experts) {
  std::vector<double> out(static_cast<std::size_t>(tokens), 0.0);
  for (int t = 0; t < tokens; ++t)
    for (int e = 0; e < experts; ++e) {
      double acc = 0.0;
      for (int d = 0; d < dim; ++d) {
        const double term =
            double(x[std::size_t(t) * dim + d]) * double(w[std::size_t(e) * dim + d]);
        acc += term * term;
      }
      out[std::size_t(t)] = std::max(out[std::size_t(t)], std::sqrt(acc));
    }
  return out;
}

/// Scores of one token's logits: sigmoid, or softmax (max-subtracted).
inline std::vector<double> scores_of(const double* l, int experts, bool sigmoid) {
  std::vector<double> s(static_cast<std::size_t>(experts));
  if (sigmoid) {
    for (int e = 0; e < experts; ++e) s[std::size_t(e)] = 1.0 / (1.0 + std::exp(-l[e]));
  } else {
    const double m = *std::max_element(l, l + experts);
    double sum = 0.0;
    for (int e = 0; e < experts; ++e) sum += (s[std::size_t(e)] = std::exp(l[e] - m));
    for (double& v : s) v /= sum;
  }
  return s;
}

/// The gate on logits [T, E] with an optional bias (empty: none).
inline Result gate(const Settings& st, const std::vector<double>& logits, int tokens,
                   const std::vector<double>& bias) {
  const double inf = std::numeric_limits<double>::infinity();
  const int per_group = st.experts / st.groups;
  Result r;
  r.ids.resize(std::size_t(tokens) * st.k);
  r.weights.resize(std::size_t(tokens) * st.k);
  r.margin.assign(std::size_t(tokens), inf);
  r.group_kept.assign(std::size_t(tokens) * st.groups, 1);
  r.max_score.assign(std::size_t(tokens), 0.0);
  r.max_selection.assign(std::size_t(tokens), 0.0);
  for (int t = 0; t < tokens; ++t) {
    const std::vector<double> s =
        scores_of(logits.data() + std::size_t(t) * st.experts, st.experts, st.sigmoid);
    std::vector<double> sel = s;
    if (!bias.empty())
      for (int e = 0; e < st.experts; ++e)
        sel[std::size_t(e)] = st.multiplicative_bias ? s[std::size_t(e)] * bias[std::size_t(e)]
                                                     : s[std::size_t(e)] + bias[std::size_t(e)];
    for (int e = 0; e < st.experts; ++e) {
      r.max_score[std::size_t(t)] = std::max(r.max_score[std::size_t(t)], s[std::size_t(e)]);
      r.max_selection[std::size_t(t)] =
          std::max(r.max_selection[std::size_t(t)], std::abs(sel[std::size_t(e)]));
    }
    double margin = inf;
    if (st.groups > 1) {
      std::vector<double> group_score(static_cast<std::size_t>(st.groups));
      for (int g = 0; g < st.groups; ++g) {
        std::vector<double> v(sel.begin() + g * per_group, sel.begin() + (g + 1) * per_group);
        std::sort(v.begin(), v.end(), std::greater<>());
        group_score[std::size_t(g)] = bias.empty() ? v[0] : (per_group >= 2 ? v[0] + v[1] : v[0]);
      }
      std::vector<int> order(static_cast<std::size_t>(st.groups));
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
        return group_score[std::size_t(a)] > group_score[std::size_t(b)];
      });
      if (st.limited_groups < st.groups) {
        margin = group_score[std::size_t(order[std::size_t(st.limited_groups - 1)])] -
                 group_score[std::size_t(order[std::size_t(st.limited_groups)])];
      }
      for (int j = st.limited_groups; j < st.groups; ++j) {
        const int g = order[std::size_t(j)];
        r.group_kept[std::size_t(t) * st.groups + g] = 0;
        for (int e = g * per_group; e < (g + 1) * per_group; ++e) sel[std::size_t(e)] = -inf;
      }
    }
    std::vector<int> order(static_cast<std::size_t>(st.experts));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int a, int b) { return sel[std::size_t(a)] > sel[std::size_t(b)]; });
    for (int j = 0; j < st.k; ++j) {
      const double next = j + 1 < st.experts ? sel[std::size_t(order[std::size_t(j + 1)])] : -inf;
      if (next != -inf) margin = std::min(margin, sel[std::size_t(order[std::size_t(j)])] - next);
    }
    r.margin[std::size_t(t)] = margin;
    double sum = 0.0;
    for (int j = 0; j < st.k; ++j) sum += s[std::size_t(order[std::size_t(j)])];
    for (int j = 0; j < st.k; ++j) {
      const int e = order[std::size_t(j)];
      double w = s[std::size_t(e)];
      if (st.normalize) w /= (sum + 1e-20);
      r.ids[std::size_t(t) * st.k + j] = e;
      r.weights[std::size_t(t) * st.k + j] = w * st.route_scale;
    }
  }
  return r;
}

/// (max c − mean c) / mean c.
inline double max_violation(const std::vector<double>& counts) {
  const double mean = std::accumulate(counts.begin(), counts.end(), 0.0) / double(counts.size());
  return (*std::max_element(counts.begin(), counts.end()) - mean) / mean;
}

/// DeepSeek-V3 eqs. 17-20 for one sequence of scores [T, E].
inline double sequence_balance_loss(const std::vector<double>& scores, int tokens, int experts,
                                    int k, double alpha) {
  std::vector<double> f(std::size_t(experts), 0.0), p(std::size_t(experts), 0.0);
  for (int t = 0; t < tokens; ++t) {
    const double* row = scores.data() + std::size_t(t) * experts;
    std::vector<int> order(static_cast<std::size_t>(experts));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return row[a] > row[b]; });
    for (int j = 0; j < k; ++j) f[std::size_t(order[std::size_t(j)])] += 1.0;
    const double sum = std::accumulate(row, row + experts, 0.0);
    for (int i = 0; i < experts; ++i) p[std::size_t(i)] += row[i] / sum / tokens;
  }
  double loss = 0.0;
  for (int i = 0; i < experts; ++i)
    loss += double(experts) / (double(k) * tokens) * f[std::size_t(i)] * p[std::size_t(i)];
  return alpha * loss;
}

/// α · E · Σ_i (c_i / (T·K)) · P_i with c from the given choice.
inline double auxiliary_balance_loss(const std::vector<double>& scores,
                                     const std::vector<std::int32_t>& ids, int tokens, int experts,
                                     int k, double alpha) {
  std::vector<double> c(std::size_t(experts), 0.0), p(std::size_t(experts), 0.0);
  for (const std::int32_t e : ids) c[std::size_t(e)] += 1.0;
  for (int t = 0; t < tokens; ++t) {
    const double* row = scores.data() + std::size_t(t) * experts;
    const double sum = std::accumulate(row, row + experts, 0.0);
    for (int i = 0; i < experts; ++i) p[std::size_t(i)] += row[i] / sum / tokens;
  }
  double loss = 0.0;
  for (int i = 0; i < experts; ++i)
    loss += c[std::size_t(i)] / (double(tokens) * k) * p[std::size_t(i)];
  return alpha * experts * loss;
}

}  // namespace moe_gate_reference
