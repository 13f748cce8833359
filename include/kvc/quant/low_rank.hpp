// kvc/quant/low_rank.hpp — quant::LowRankKeys<Residual>: each kv head's keys stored as r
// numbers in a rank-r basis fitted to that head's prefill keys by SVD; values in fp16.
//
// Papers:     Wang et al., "CSKV: Training-Efficient Channel Shrinking for KV Cache in
//             Long-Context Scenarios", 2024 (arXiv 2409.10593): keys in a low-rank space found
//             by SVD of the key cache, and a bi-branch cache whose recent window stays in full
//             precision. Sun et al., "ShadowKV: KV Cache in Shadows for High-Throughput
//             Long-Context LLM Inference", ICML 2025 (arXiv 2410.21465): K ≈ U_r Σ_r V_rᵀ
//             from an SVD of the prefill keys of each head.
// Format:     per kv head, one basis V (d × r, orthonormal columns), fp32 row-major: V[c][j]
//             is float c·r + j (key_group_bytes = 4·d·r). Per token: the key as r fp16 numbers
//             a = fp16(Vᵀk) (key_bytes = 2r, a row of the paper's A = K·V_r), the value as d
//             fp16 (quant::Dense<half>). The newest Residual keys and values of each head stay
//             in fp32 (KvCache's window). d = 128, r = 32: 64 + 256 = 320 bytes per token
//             (Dense<half>: 512), plus 16 KiB of basis per kv head.
// Keeps:      k̂ = V·a: k projected on the span of the r leading right singular vectors of the
//             head's fitted keys (the best rank-r subspace for them in least squares), with a
//             rounded to fp16: ‖k − k̂‖ ≤ ‖k − VVᵀk‖ + 2⁻¹¹·‖Vᵀk‖ (up to fp32 rounding). Keys
//             of exact rank ≤ r come back to fp16 precision. Scores use q·k̂ = (Vᵀq)·a.
// Fit:        at the end of the first append that leaves more than Residual keys waiting in a
//             kv head — the prefill, when it comes in one chunk (a host that appends token by
//             token fits to its first Residual + 1 keys). V = the eigenvectors of the r largest
//             eigenvalues of KᵀK over the waiting keys (the product in fp32 through Eigen, the
//             d × d eigensolver in double): KᵀK = V Σ² Vᵀ gives K's right singular vectors in
//             O(n·d² + d³), not an n × d SVD. Each column's sign makes its largest-magnitude
//             entry positive, so the basis is a deterministic function of the keys. Every
//             waiting key but the newest Residual is then encoded; each later key is encoded in
//             the same basis when it leaves the window (CSKV's re-projection; no refit).
// Needs:      nothing from the host but the keys. 1 ≤ rank ≤ head_dim ≤ 256, and |x| ≤ 4000
//             for keys and values (KvCache rejects larger): |a_j| ≤ ‖k‖ ≤ √d · 4000 ≤ 64000
//             keeps every coefficient finite in fp16.
// Cost/step:  appending a token encodes the key leaving the window: d·r multiply-adds. attend
//             projects each query row once per block (rows × d × r, Eigen's GEMM), then scores
//             r-wide fp16 rows (simd::dot_block): a key read is 2r bytes instead of 2d. Values
//             are Dense<half>'s. The fit: O(n·d² + d³) once per kv head.
// Eviction:   a stored token keeps its coefficients whatever is evicted around it; the basis is
//             freed with the head's last encoded key (a later append then fits a new one).
// Choices:    the host's keys as given (post-RoPE): ShadowKV fits pre-RoPE keys and rotates at
//             attend, which needs the host's RoPE — kvc stores what the host attends with.
//             A fixed basis after the fit (no refit as the context grows), as both papers.
#pragma once

#include <kvc/core/error.hpp>
#include <kvc/core/events.hpp>
#include <kvc/quant/projected.hpp>
#include <kvc/simd/kernels.hpp>

#include <Eigen/Core>
#include <Eigen/Eigenvalues>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <string_view>

namespace kvc::quant {

template <std::size_t Residual = 128>
class LowRankKeys : public detail::ProjectedKeys<LowRankKeys<Residual>> {
  using Base = detail::ProjectedKeys<LowRankKeys<Residual>>;

 public:
  static_assert(Residual > 0, "quant::LowRankKeys: Residual (the exact window) is positive");
  // KvCache's FitsKeys protocol: the exact window, and when a head's basis is fitted.
  static constexpr std::size_t residual_tokens = Residual;
  static constexpr bool fits_on_observe = false;

  LowRankKeys() : LowRankKeys(32) {}
  explicit LowRankKeys(std::size_t rank) : rank_(rank) {
    if (rank == 0 || rank > 256) {
      kvc::detail::fail<ValueError>("{}: rank {} is out of range, expected 1..256", name(), rank);
    }
  }

  static constexpr std::string_view name() noexcept { return "lowrank"; }
  static constexpr float max_magnitude() noexcept { return 4000.0F; }

  std::size_t rank() const noexcept { return rank_; }
  bool supports_head_dim(std::size_t head_dim) const noexcept {
    return head_dim >= rank_ && head_dim <= 256;
  }
  std::size_t projected_dim(std::size_t /*head_dim*/) const noexcept { return rank_; }
  std::size_t key_group_bytes(std::size_t head_dim) const noexcept {
    return head_dim * rank_ * sizeof(float);
  }

  // V = the r leading eigenvectors of KᵀK (see Fit above).
  void fit_keys(const KeyFit& fit, std::byte* basis_bytes) const {
    using RowMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    const auto d = static_cast<Eigen::Index>(fit.head_dim);
    const Eigen::Map<const RowMajor> keys(fit.keys, static_cast<Eigen::Index>(fit.tokens), d);
    const Eigen::MatrixXf gram = keys.transpose() * keys;
    const Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> solver(gram.cast<double>());
    float* basis = reinterpret_cast<float*>(basis_bytes);
    for (std::size_t j = 0; j < rank_; ++j) {
      // Eigenvalues ascend: column d − 1 − j is the j-th largest.
      const auto column = solver.eigenvectors().col(d - 1 - static_cast<Eigen::Index>(j));
      Eigen::Index largest = 0;
      column.cwiseAbs().maxCoeff(&largest);
      const double sign = column[largest] < 0.0 ? -1.0 : 1.0;
      for (Eigen::Index c = 0; c < d; ++c) {
        basis[static_cast<std::size_t>(c) * rank_ + j] = static_cast<float>(sign * column[c]);
      }
    }
  }

  // out = Vᵀ·row (r floats).
  void project_key(const float* row, std::size_t head_dim, const std::byte* basis,
                   float* out) const noexcept {
    std::fill(out, out + rank_, 0.0F);
    for (std::size_t c = 0; c < head_dim; ++c)
      simd::axpy(row[c], matrix(basis) + c * rank_, out, rank_);
  }

  // k̂ = V·a.
  void decode_key(const std::byte* codes, std::size_t head_dim, const std::byte* basis,
                  float* out) const noexcept {
    for (std::size_t c = 0; c < head_dim; ++c) {
      out[c] = simd::dot(matrix(basis) + c * rank_, Base::stored(codes), rank_);
    }
  }

  // out (rows × r) = queries (rows × d) · V.
  void project_queries(const float* queries, std::size_t rows, std::size_t head_dim,
                       const std::byte* basis, float* out) const {
    using RowMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    const auto d = static_cast<Eigen::Index>(head_dim);
    const auto r = static_cast<Eigen::Index>(rank_);
    const auto n = static_cast<Eigen::Index>(rows);
    Eigen::Map<RowMajor>(out, n, r).noalias() =
        Eigen::Map<const RowMajor>(queries, n, d) * Eigen::Map<const RowMajor>(matrix(basis), d, r);
  }

 private:
  static const float* matrix(const std::byte* basis) noexcept {
    return reinterpret_cast<const float*>(basis);
  }

  std::size_t rank_;
};

}  // namespace kvc::quant
