// SPDX-License-Identifier: Apache-2.0
#pragma once

// An independent double-precision reference of DeepSeek's MoE experts and combine, written from
// the DeepSeek-V3 report (arXiv 2412.19437, section 2.1.2) and DeepSeek-V3's inference/model.py
// (`Expert`, `MLP`, `MoE.forward`: for each expert, the tokens routed to it, y[idx] +=
// expert(x[idx]) · weights[idx, top]; then y + shared_experts(x)), not from daedalus: it includes
// no daedalus header, reads plain row-major [out, in] fp32 weight arrays and computes in double,
// token by token, looping over each token's chosen experts. Also the rule of which slots a capacity
// keeps, written as Megatron-Core's token dropping describes it (per expert, the top-C by
// probability or the first C in token order), independently of daedalus's plan.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

namespace moe_reference {

using Vec = std::vector<double>;

/// One SwiGLU MLP: w1, w3 [inter, dim], w2 [dim, inter], row-major fp32 (nn.Linear layout).
struct Mlp {
  const float* w1;
  const float* w3;
  const float* w2;
  int inter;
};

/// w2(silu(w1 x) ⊙ w3 x) of one row x [dim], in double.
inline Vec swiglu(const float* x, int dim, const Mlp& mlp) {
  Vec h(std::size_t(mlp.inter));
  for (int i = 0; i < mlp.inter; ++i) {
    double a = 0.0, b = 0.0;
    for (int d = 0; d < dim; ++d) {
      a += double(mlp.w1[std::size_t(i) * dim + d]) * double(x[d]);
      b += double(mlp.w3[std::size_t(i) * dim + d]) * double(x[d]);
    }
    h[std::size_t(i)] = a / (1.0 + std::exp(-a)) * b;  // silu(a) · b
  }
  Vec y(std::size_t(dim), 0.0);
  for (int d = 0; d < dim; ++d) {
    double s = 0.0;
    for (int i = 0; i < mlp.inter; ++i) s += double(mlp.w2[std::size_t(d) * mlp.inter + i]) * h[i];
    y[std::size_t(d)] = s;
  }
  return y;
}

/// The MoE output of one token: Σ over its kept slots j of weight_j · expert_{id_j}(x), plus the
/// shared MLP's output when `shared` is given. `kept` (k flags) says which slots survived a
/// capacity; null keeps all.
inline Vec moe_token(const float* x, int dim, const std::int32_t* ids, const float* weights, int k,
                     const std::vector<Mlp>& experts, const Mlp* shared,
                     const std::vector<bool>* kept = nullptr, int token = 0) {
  Vec out(std::size_t(dim), 0.0);
  if (shared != nullptr && shared->inter > 0) out = swiglu(x, dim, *shared);
  for (int j = 0; j < k; ++j) {
    if (kept != nullptr && !(*kept)[std::size_t(token) * k + j]) continue;
    const Vec y = swiglu(x, dim, experts[std::size_t(ids[j])]);
    for (int d = 0; d < dim; ++d) out[std::size_t(d)] += double(weights[j]) * y[std::size_t(d)];
  }
  return out;
}

/// Which of the tokens · k slots an expert capacity keeps. For each expert, its slots (slot s =
/// token · k + j) are ranked: by_probs, by weight descending, equal weights by slot ascending;
/// otherwise by slot ascending (token position). The first `capacity` of each expert are kept.
inline std::vector<bool> kept_slots(const std::vector<std::int32_t>& ids,
                                    const std::vector<float>& weights, int num_experts,
                                    long capacity, bool by_probs) {
  std::vector<bool> kept(ids.size(), false);
  for (int e = 0; e < num_experts; ++e) {
    std::vector<long> mine;
    for (std::size_t s = 0; s < ids.size(); ++s)
      if (ids[s] == e) mine.push_back(long(s));
    if (by_probs) {
      std::stable_sort(mine.begin(), mine.end(), [&](long a, long b) {
        return double(weights[std::size_t(a)]) > double(weights[std::size_t(b)]);
      });
    }
    for (std::size_t i = 0; i < mine.size() && long(i) < capacity; ++i)
      kept[std::size_t(mine[i])] = true;
  }
  return kept;
}

/// Gate-like ids for tests: for each token, k distinct experts. `draw(n)` returns an integer
/// uniform in [0, n). With `favoured` > 0, each pick first tries expert draw(favoured) with
/// probability one half, so experts [0, favoured) are overloaded (for capacity tests).
template <class Draw>
std::vector<std::int32_t> distinct_ids(Draw&& draw, int tokens, int k, int num_experts,
                                       int favoured = 0) {
  std::vector<std::int32_t> ids(std::size_t(tokens) * k);
  for (int t = 0; t < tokens; ++t) {
    std::vector<int> pool(static_cast<std::size_t>(num_experts));
    std::iota(pool.begin(), pool.end(), 0);
    for (int j = 0; j < k; ++j) {
      int pick = -1;
      if (favoured > 0 && draw(2) == 0) {
        const int want = draw(favoured);
        const auto it = std::find(pool.begin(), pool.end(), want);
        if (it != pool.end()) {
          pick = want;
          pool.erase(it);
        }
      }
      if (pick < 0) {
        const auto at = std::size_t(draw(int(pool.size())));
        pick = pool[at];
        pool.erase(pool.begin() + std::ptrdiff_t(at));
      }
      ids[std::size_t(t) * k + j] = pick;
    }
  }
  return ids;
}

}  // namespace moe_reference
