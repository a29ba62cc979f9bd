// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "daedalus/config/concepts.hpp"
#include "daedalus/core/backend.hpp"
#include "daedalus/core/error.hpp"
#include "daedalus/core/tensor_view.hpp"
#include "daedalus/cuda/backend.cuh"
#include "daedalus/cuda/blas.cuh"
#include "daedalus/cuda/check.cuh"
#include "daedalus/cuda/device_buffer.cuh"
#include "daedalus/kv_cache/contiguous.hpp"
#include "daedalus/kv_cache/cuda/contiguous.cuh"
#include "daedalus/kv_cache/cuda/device_rows.cuh"
#include "daedalus/kv_cache/cuda/encode_rows.cuh"
#include "daedalus/kv_cache/cuda/paged.cuh"
#include "daedalus/kv_cache/paged.hpp"
#include "daedalus/kv_cache/paged_view.hpp"
#include "daedalus/mla/attention.hpp"
#include "daedalus/mla/cuda/absorbed_decode.cuh"
#include "daedalus/mla/cuda/norm_rope.cuh"
#include "daedalus/mla/cuda/prefill.cuh"
#include "daedalus/mla/cuda/weights.cuh"
#include "daedalus/mla/rope.hpp"

/// The CUDA implementation of MLA: the fronts of mla/attention.hpp with CudaBackend.
///
/// Precision. The projections are cuBLAS GEMMs with inputs in the weights' type T (bf16 by
/// default) and fp32 accumulation and output: each activation that enters a GEMM (x, the normed
/// q_a, q_nope before the W_UK absorption, the attention output in latent space before W_UV, the
/// attention output before wo) is rounded to T first, which adds at most u_T = 2^-8 (bf16)
/// relative to each input. RMSNorm, RoPE, the softmax and everything between the GEMMs stay in
/// fp32, as on the CPU. The naive path's attention products (scores and P·V, after the bf16 ×
/// bf16 up-projection of the cached rows) are fp32 GEMMs; the absorbed path's attention is the
/// tensor-core decode kernel (mla/cuda/absorbed_decode.cuh), which rounds q and p to the cache's
/// type. Compared with the CPU backend run on the same T-rounded weights
/// (DeviceMlaWeights::rounded) and a cache of the same type, the results differ by those
/// activation roundings only.
///
/// Streams and scratch. Every kernel, copy and GEMM of a call is issued to the backend's stream.
/// Scratch buffers (and the decode kernel's workspace) are kept per host thread and per stream
/// and only grow: a decode loop on one stream allocates nothing after its first step. The fronts'
/// finiteness check of x costs one device-to-host copy of a flag (a stream synchronisation), the
/// price of refusing non-finite input before anything is written; naive_attention over a device
/// PagedLatentView copies the lengths to the host (they size the up-projection). Nothing else
/// synchronises.
namespace daedalus::mla {
namespace detail {

template <MlaConfig C>
struct MlaImpl<C, CudaBackend> {
  using S = MlaShape<C>;
  static constexpr index_t H = S::n_heads;
  static constexpr index_t D = S::latent_dim;
  static constexpr index_t QK = S::qk_head_dim;
  static constexpr index_t V = S::kv_lora_rank;
  static constexpr index_t VD = S::v_head_dim;
  static constexpr index_t KVB = S::kv_b_rows_per_head;
  static constexpr index_t NOPE = S::nope;

  /// Query rows (tokens × heads) per sequence the absorbed decode kernel takes in one call (its
  /// combine grid's limit). An absorbed-mode chunk longer than that runs the naive path, which
  /// computes the same attention (reference/mla.md step 4) without the limit.
  static constexpr index_t kMaxAbsorbedRows =
      index_t(65535) * mla::cuda::detail::DecodeTiling::combine_rows;

  /// Scores of the naive path are computed for this many (head, query, key) triples at most at
  /// once (256 MiB of fp32); longer chunks are processed in slices of query rows.
  static constexpr index_t kScoreBudget = index_t(1) << 26;

  /// Grow-only device scratch of one (host thread, stream).
  struct Workspace {
    daedalus::cuda::DeviceBuffer<double> frequencies;  // rope_frequencies<C>()
    daedalus::cuda::DeviceBuffer<std::int32_t> starts;
    daedalus::cuda::DeviceBuffer<unsigned long long> flag;
    daedalus::cuda::DeviceBuffer<float> f32[8];
    daedalus::cuda::DeviceBuffer<std::byte> bytes[4];
    DeviceBlockTable table;
    DeviceBatchRows batch_rows;
    mla::cuda::AbsorbedDecodeWorkspace decode;

    explicit Workspace(const CudaBackend& backend) : flag(1) {
      const auto freqs = rope_frequencies<C>();
      frequencies = daedalus::cuda::to_device(backend, std::span<const double>(freqs));
    }

    /// Scratch slot `slot`, at least n floats.
    float* floats(int slot, index_t n) { return grown(f32[slot], std::size_t(n)); }
    /// Scratch slot `slot`, at least n elements of E.
    template <class E>
    E* elements(int slot, index_t n) {
      return reinterpret_cast<E*>(grown(bytes[slot], std::size_t(n) * sizeof(E)));
    }
    /// `starts` (host) on the device, as int32.
    const std::int32_t* upload_starts(const CudaBackend& backend, std::span<const index_t> host) {
      std::vector<std::int32_t> values(host.begin(), host.end());
      grown(starts, values.size());
      if (!values.empty())
        DAEDALUS_CUDA_CHECK(cudaMemcpyAsync(starts.data(), values.data(),
                                            values.size() * sizeof(std::int32_t),
                                            cudaMemcpyHostToDevice, backend.stream()));
      return starts.data();
    }

   private:
    template <class T>
    static T* grown(daedalus::cuda::DeviceBuffer<T>& buffer, std::size_t n) {
      if (buffer.size() < n)
        buffer = daedalus::cuda::DeviceBuffer<T>(std::max(n, 2 * buffer.size()));
      return buffer.data();
    }
  };

  // Scratch slots (Workspace::f32 / bytes), named by what they hold.
  enum FloatSlot : int { kQ, kLatent, kQa, kQAbs, kOLatent, kO, kKv, kKeys };
  enum ByteSlot : int { kInput, kInput2, kRows, kOutput };

  static Workspace& workspace(const CudaBackend& backend) {
    static thread_local std::unordered_map<cudaStream_t, std::unique_ptr<Workspace>> spaces;
    std::unique_ptr<Workspace>& space = spaces[backend.stream()];
    if (!space) space = std::make_unique<Workspace>(backend);
    return *space;
  }

  /// The fronts' finiteness check: a device scan and one flag copy (a stream synchronisation);
  /// NumericError naming the first non-finite value by row (over every leading extent) and
  /// column, as the CPU backend words it.
  template <int Rank>
  static void require_finite(const CudaBackend& backend, std::string_view function,
                             std::string_view argument,
                             TensorView<const float, Rank, DeviceMemory> values) {
    const index_t width = values.extent(Rank - 1);
    Workspace& ws = workspace(backend);
    if (const auto bad =
            daedalus::cuda::first_non_finite(backend, values.data(), values.size(), ws.flag)) {
      throw NumericError(daedalus::detail::message(
          function, ": '", argument, "' holds a non-finite value (", bad->second, ") at row ",
          bad->first / width, ", column ", bad->first % width));
    }
  }

  /// MLA.forward steps 1-3 for `tokens` tokens, token t at position starts[t / q_len] +
  /// t % q_len (starts on the device): q [tokens, H, QK] and latent [tokens, D] (device fp32).
  template <class T>
  static void project_tokens(const CudaBackend& cuda, const DeviceMlaWeights<C, T>& w,
                             Workspace& ws, const std::int32_t* starts, index_t q_len,
                             index_t tokens, const float* x, float* q, float* latent) {
    using E = typename DeviceMlaWeights<C, T>::device_element_type;
    if (tokens == 0) return;
    E* x_t = ws.template elements<E>(kInput, tokens * S::dim);
    ::daedalus::cuda::launch_convert_rows(cuda, x, tokens, S::dim, S::dim, x_t, S::dim);
    if constexpr (S::has_q_lora) {
      float* q_a = ws.floats(kQa, tokens * S::q_lora_rank);
      daedalus::cuda::linear(cuda, x_t, tokens, S::dim, w.wq_a(), S::q_lora_rank, q_a);
      E* q_a_t = ws.template elements<E>(kInput2, tokens * S::q_lora_rank);
      mla::cuda::launch_rms_norm(cuda, q_a, tokens, S::q_lora_rank, S::q_lora_rank, w.q_norm(),
                                 C::norm_eps, q_a_t, S::q_lora_rank);
      daedalus::cuda::linear(cuda, q_a_t, tokens, S::q_lora_rank, w.wq_b(), H * QK, q);
    } else {
      daedalus::cuda::linear(cuda, x_t, tokens, S::dim, w.wq(), H * QK, q);
    }
    daedalus::cuda::linear(cuda, x_t, tokens, S::dim, w.wkv_a(), D, latent);
    // Only the latent is normed (in place); k_pe is rotated and never normed (MLA.forward).
    mla::cuda::launch_rms_norm(cuda, latent, tokens, S::kv_lora_rank, D, w.kv_norm(), C::norm_eps,
                               latent, D);
    mla::cuda::launch_rope<C>(cuda, q, latent, ws.frequencies.data(), starts, q_len, tokens);
  }

  template <class T>
  static void project(const CudaBackend& cuda, const DeviceMlaWeights<C, T>& w, index_t start_pos,
                      TensorView<const float, 2, DeviceMemory> x,
                      TensorView<float, 3, DeviceMemory> q,
                      TensorView<float, 2, DeviceMemory> latent) {
    Workspace& ws = workspace(cuda);
    const std::int32_t* starts = ws.upload_starts(cuda, std::span<const index_t>(&start_pos, 1));
    const index_t tokens = x.extent(0);
    project_tokens(cuda, w, ws, starts, std::max<index_t>(tokens, 1), tokens, x.data(), q.data(),
                   latent.data());
  }

  /// The cache's kernels and copies (encode_rows, view uploads) go to the cache's own stream, the
  /// layer's to the backend's: they must be one stream, or nothing orders them.
  /// @throws InvalidArgument otherwise (before anything is written).
  template <class Cache>
  static void require_cache(const CudaBackend& backend, std::string_view function,
                            const Cache& cache) {
    daedalus::detail::require<InvalidArgument>(
        cache.backend().stream() == backend.stream(), function,
        ": 'cache' issues its work to another CUDA stream than 'backend'; expected the same "
        "stream (build the cache with this backend, or pass cache.backend())");
  }

  // ---- naive (up-projection) attention ---------------------------------------------------------

  /// Naive attention of batch entry `entry` (MLA.forward, attn_impl = "naive"): its `length`
  /// cached rows are gathered, up-projected through wkv_b into every head's [k_nope ; v] (one
  /// bf16 GEMM), the keys [k_nope ; k_pe] assembled, then per slice of query rows: scores
  /// q·kᵀ (a strided-batched fp32 GEMM over heads), the causal softmax, and P·V (another).
  /// q [q_len, H, QK], o [q_len, H, VD] (device fp32).
  template <class T, class Storage, class Address>
  static void naive_entry(const CudaBackend& cuda, const DeviceMlaWeights<C, T>& w, Workspace& ws,
                          const daedalus::cuda::DeviceLatentBatch<Address>& cache, int entry,
                          index_t length, index_t q_len, const float* q, float scale, float* o) {
    using E = typename DeviceMlaWeights<C, T>::device_element_type;
    using R = daedalus::cuda::device_storage_t<Storage>;
    static_assert(std::is_same_v<E, R>,
                  "daedalus::mla: the CUDA backend's naive attention needs the weights and the "
                  "cache in the same 16-bit type (bfloat16 weights with a bfloat16 cache, half "
                  "with half)");
    using daedalus::cuda::RowMajorOperand;
    using daedalus::cuda::RowMajorOutput;
    using daedalus::cuda::Weight;
    if (q_len == 0) return;
    if (length == 0) {
      // No cached token: every row sees nothing and gets zeros, as on the CPU.
      DAEDALUS_CUDA_CHECK(
          cudaMemsetAsync(o, 0, std::size_t(q_len * H * VD) * sizeof(float), cuda.stream()));
      return;
    }
    R* rows = ws.template elements<R>(kRows, length * D);
    mla::cuda::launch_gather_rows<R>(cuda, cache, entry, length, int(D), rows);
    // [length, H·(nope + v)] = c [length, kv_lora_rank] · wkv_bᵀ: every head's k_nope and v.
    float* kv = ws.floats(kKv, length * H * KVB);
    daedalus::cuda::gemm(cuda, length, H * KVB, V, RowMajorOperand<E>{rows, D},
                         RowMajorOperand<E>{w.wkv_b(), V}, Weight::transposed,
                         RowMajorOutput{kv, H * KVB});
    float* keys = ws.floats(kKeys, H * length * QK);
    mla::cuda::launch_assemble_keys(
        cuda, mla::cuda::AssembleKeysParams<R>{kv, rows, keys, int(length), int(H), int(NOPE),
                                               int(S::rope), int(KVB), int(V), int(D)});
    const index_t first_query_pos = length - q_len;
    const index_t slice = std::clamp<index_t>(kScoreBudget / (H * length), 1, q_len);
    for (index_t i0 = 0; i0 < q_len; i0 += slice) {
      const index_t n = std::min(slice, q_len - i0);
      float* scores = ws.floats(kQAbs, H * n * length);  // [H, n, length]
      daedalus::cuda::gemm_strided_batched(
          cuda, H, n, length, QK, RowMajorOperand<float>{q + i0 * H * QK, H * QK, QK},
          RowMajorOperand<float>{keys, QK, length * QK}, Weight::transposed,
          RowMajorOutput{scores, length, n * length});
      mla::cuda::launch_causal_softmax(cuda, scores, int(H), n, length, first_query_pos + i0,
                                       scale);
      // o[i, h] = Σ_t p[h, i, t] v_h(t): v_h(t) is kv[t, h·KVB + nope ...], rows H·KVB apart.
      daedalus::cuda::gemm_strided_batched(
          cuda, H, n, VD, length, RowMajorOperand<float>{scores, length, n * length},
          RowMajorOperand<float>{kv + NOPE, H * KVB, KVB}, Weight::as_stored,
          RowMajorOutput{o + i0 * H * VD, H * VD, VD});
    }
  }

  template <class T, class Storage>
  static void naive_attention(const CudaBackend& cuda, const DeviceMlaWeights<C, T>& w,
                              const ContiguousLatentCache<C, CudaBackend, Storage>& cache,
                              std::span<const index_t> seqs,
                              TensorView<const float, 4, DeviceMemory> q, double scale,
                              TensorView<float, 4, DeviceMemory> out) {
    Workspace& ws = workspace(cuda);
    const auto batch = cache.batch(seqs, ws.batch_rows);
    const index_t q_len = q.extent(1);
    for (std::size_t b = 0; b < seqs.size(); ++b) {
      naive_entry<T, Storage>(cuda, w, ws, batch, int(b), cache.length(seqs[b]), q_len,
                              q.data() + index_t(b) * q_len * H * QK, float(scale),
                              out.data() + index_t(b) * q_len * H * VD);
    }
  }

  template <class T, class Storage, int BlockSize>
  static void naive_attention(const CudaBackend& cuda, const DeviceMlaWeights<C, T>& w,
                              const PagedLatentView<C, Storage, BlockSize, DeviceMemory>& view,
                              TensorView<const float, 4, DeviceMemory> q, double scale,
                              TensorView<float, 4, DeviceMemory> out) {
    mla::cuda::validate_on_device(cuda, view, "daedalus::mla::naive_attention");
    Workspace& ws = workspace(cuda);
    const index_t batch = view.batch();
    // The lengths size the up-projection of each entry: read them once (a synchronisation).
    std::vector<std::int32_t> lengths(static_cast<std::size_t>(batch));
    if (batch > 0) {
      DAEDALUS_CUDA_CHECK(cudaMemcpyAsync(lengths.data(), view.cache_seqlens.data(),
                                          lengths.size() * sizeof(std::int32_t),
                                          cudaMemcpyDeviceToHost, cuda.stream()));
      cuda.synchronize();
    }
    const auto rows = daedalus::cuda::latent_batch(view);
    const index_t q_len = q.extent(1);
    for (index_t b = 0; b < batch; ++b) {
      naive_entry<T, Storage>(cuda, w, ws, rows, int(b), lengths[std::size_t(b)], q_len,
                              q.data() + b * q_len * H * QK, float(scale),
                              out.data() + b * q_len * H * VD);
    }
  }

  // ---- absorbed attention ----------------------------------------------------------------------

  template <class Storage, class Address>
  static void absorbed_rows(const CudaBackend& cuda, Workspace& ws,
                            const daedalus::cuda::DeviceLatentBatch<Address>& batch, index_t q_len,
                            const float* q, double scale, float* out_latent) {
    if (batch.batch == 0 || q_len == 0) return;
    mla::cuda::absorbed_decode<C, Storage>(cuda, batch, int(q_len), q, float(scale), out_latent,
                                           ws.decode);
  }

  template <class Storage>
  static void absorbed_attention(const CudaBackend& cuda,
                                 const ContiguousLatentCache<C, CudaBackend, Storage>& cache,
                                 std::span<const index_t> seqs,
                                 TensorView<const float, 4, DeviceMemory> q, double scale,
                                 TensorView<float, 4, DeviceMemory> out_latent) {
    Workspace& ws = workspace(cuda);
    const auto batch = cache.batch(seqs, ws.batch_rows);
    absorbed_rows<Storage>(cuda, ws, batch, q.extent(1), q.data(), scale, out_latent.data());
  }

  template <class Storage, int BlockSize>
  static void absorbed_attention(const CudaBackend& cuda,
                                 const PagedLatentView<C, Storage, BlockSize, DeviceMemory>& view,
                                 TensorView<const float, 4, DeviceMemory> q, double scale,
                                 TensorView<float, 4, DeviceMemory> out_latent) {
    mla::cuda::validate_on_device(cuda, view, "daedalus::mla::absorbed_attention");
    Workspace& ws = workspace(cuda);
    absorbed_rows<Storage>(cuda, ws, daedalus::cuda::latent_batch(view), q.extent(1), q.data(),
                           scale, out_latent.data());
  }

  // ---- the layer -----------------------------------------------------------------------------

  /// The batch of `seqs` in a device cache as the kernels read it (after the chunk's rows were
  /// written), built in the workspace.
  template <class Storage, int BlockSize>
  static auto device_batch(const PagedLatentCache<C, CudaBackend, Storage, BlockSize>& cache,
                           std::span<const index_t> seqs, Workspace& ws) {
    return daedalus::cuda::latent_batch(cache.view(seqs, ws.table));
  }
  template <class Storage>
  static auto device_batch(const ContiguousLatentCache<C, CudaBackend, Storage>& cache,
                           std::span<const index_t> seqs, Workspace& ws) {
    return cache.batch(seqs, ws.batch_rows);
  }

  /// MLA.forward for `q_len` tokens of each sequence in `seqs`, token i of sequence b at
  /// position starts[b] + i, over a device contiguous or paged cache; x and out are device
  /// [batch · q_len, dim]. The front has validated every argument (and x's finiteness), so the
  /// rows go to the cache by its unchecked encode_rows path.
  template <class T, class Cache>
  static void forward(const CudaBackend& cuda, const DeviceMlaWeights<C, T>& w, Cache& cache,
                      std::span<const index_t> seqs, std::span<const index_t> starts, index_t q_len,
                      const float* x, float* out, AttentionMode mode) {
    using E = typename DeviceMlaWeights<C, T>::device_element_type;
    using Storage = typename Cache::storage_type;
    using daedalus::cuda::RowMajorOperand;
    using daedalus::cuda::RowMajorOutput;
    using daedalus::cuda::Weight;
    Workspace& ws = workspace(cuda);
    const index_t batch = index_t(seqs.size());
    const index_t tokens = batch * q_len;
    float* q = ws.floats(kQ, tokens * H * QK);
    float* latent = ws.floats(kLatent, tokens * D);
    const std::int32_t* device_starts = ws.upload_starts(cuda, starts);
    project_tokens(cuda, w, ws, device_starts, std::max<index_t>(q_len, 1), tokens, x, q, latent);
    // Rows of an empty chunk: none, but each length still becomes its start (as on the CPU).
    cache.encode_rows(seqs, starts, q_len, latent);
    if (tokens == 0) return;
    const auto rows = device_batch(cache, seqs, ws);
    float* o = ws.floats(kO, tokens * H * VD);  // [tokens, H, VD]
    const double scale = softmax_scale<C>();
    if (mode == AttentionMode::absorbed && q_len * H <= kMaxAbsorbedRows) {
      float* q_abs = ws.floats(kQAbs, tokens * H * D);
      E* q_nope = ws.template elements<E>(kInput, tokens * H * NOPE);
      mla::cuda::launch_split_query(
          cuda, mla::cuda::SplitQueryParams<E>{q, q_nope, q_abs, tokens, int(H), int(NOPE),
                                               int(S::rope), int(V)});
      // q_lat[h] = q_nope[h] · W_UK[h] ([nope, kv_lora_rank], rows KVB·V apart per head).
      daedalus::cuda::gemm_strided_batched(cuda, H, tokens, V, NOPE,
                                           RowMajorOperand<E>{q_nope, H * NOPE, NOPE},
                                           RowMajorOperand<E>{w.wkv_b(), V, KVB * V},
                                           Weight::as_stored, RowMajorOutput{q_abs, H * D, D});
      float* o_lat = ws.floats(kOLatent, tokens * H * V);
      absorbed_rows<Storage>(cuda, ws, rows, q_len, q_abs, scale, o_lat);
      E* o_lat_t = ws.template elements<E>(kInput2, tokens * H * V);
      ::daedalus::cuda::launch_convert_rows(cuda, o_lat, tokens * H, V, V, o_lat_t, V);
      // o[h] = o_lat[h] · W_UV[h]ᵀ (W_UV[h] is [v_head_dim, kv_lora_rank] after W_UK[h]).
      daedalus::cuda::gemm_strided_batched(cuda, H, tokens, VD, V,
                                           RowMajorOperand<E>{o_lat_t, H * V, V},
                                           RowMajorOperand<E>{w.wkv_b() + NOPE * V, V, KVB * V},
                                           Weight::transposed, RowMajorOutput{o, H * VD, VD});
    } else {
      for (index_t b = 0; b < batch; ++b) {
        naive_entry<T, Storage>(cuda, w, ws, rows, int(b), starts[std::size_t(b)] + q_len, q_len,
                                q + b * q_len * H * QK, float(scale), o + b * q_len * H * VD);
      }
    }
    E* o_t = ws.template elements<E>(kOutput, tokens * H * VD);
    ::daedalus::cuda::launch_convert_rows(cuda, o, tokens, H * VD, H * VD, o_t, H * VD);
    daedalus::cuda::linear(cuda, o_t, tokens, H * VD, w.wo(), S::dim, out);
  }
};

}  // namespace detail
}  // namespace daedalus::mla
