// kvc/quant/think.hpp — quant::Think<Residual>: query-driven pruning of key channels. Each
// kv head stores only the key channels that matter to its window queries; values intact.
//
// Paper:      Xu et al., "ThinK: Thinner Key Cache by Query-Driven Pruning", ICLR 2025
//             (arXiv 2407.21018, github.com/SalesforceAIResearch/ThinK).
// Format:     per kv head, the kept channels' indices, ascending, as uint16
//             (key_group_bytes = 2·r). Per token: the key's r kept channels in fp16
//             (key_bytes = 2r), the value as d fp16 (quant::Dense<half>). The newest Residual
//             keys and values of each head stay whole in fp32 (ThinK keeps every channel of the
//             last 32 tokens). r = d − ⌊λ·d⌋ rounded up to a multiple of 16 (at most d):
//             d = 128, λ = 0.4 keeps r = 80 channels: 160 + 256 = 416 bytes per token
//             (Dense<half>: 512).
// Keeps:      per kv head, channel score s_c = (mean over the window's query rows, the whole
//             GQA group, of q_c²) × (mean over the head's keys of k_c²) — the ranking of
//             ThinK's ‖Q_c K_cᵀ‖_F = ‖Q_c‖·‖K_c‖ — and the r channels of highest score (ties:
//             the lower channel). A stored key is its kept channels rounded to fp16 (nearest
//             even); the pruned channels decode as 0. Scores: q·k̂ = Σ_{c kept} q_c·k_c.
// Fit:        at observe(): each kv head without a basis and with more than Residual keys
//             waiting takes the window queries and every waiting key (the prefill), then
//             stores all but the newest Residual in r channels; each later key is stored so
//             when it leaves the window. Until a head is fitted its keys wait in fp32 (call
//             observe after the prefill, as SnapKV's pipeline does).
// Needs:      window queries through observe() (the host's last w query rows); nothing else.
//             0 ≤ λ < 1, 1 ≤ head_dim ≤ 1024; |x| ≤ 65504 (fp16).
// Cost/step:  appending a token gathers r channels of the key leaving the window. attend
//             gathers r channels of each query row once per block, then scores r-wide fp16 rows
//             (simd::dot_block): a key read is 2r bytes instead of 2d. Values are
//             Dense<half>'s. The fit: O((w·g + n)·d + d log d) once per kv head.
// Eviction:   a stored token keeps its channels whatever is evicted around it; the kept
//             channel list is freed with the head's last encoded key.
// Choices:    r rounded up to a multiple of 16 so every stored key row is whole AVX-512 fp16
//             vectors (λ = 0.4 prunes 37.5 % at d = 128, not 40 %). The score's key factor runs
//             over every key the head holds at the fit, including tokens an eviction in the
//             same compression then drops (ThinK prunes after SnapKV's selection).
#pragma once

#include <kvc/core/error.hpp>
#include <kvc/core/events.hpp>
#include <kvc/quant/projected.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <string_view>
#include <vector>

namespace kvc::quant {

template <std::size_t Residual = 32>
class Think : public detail::ProjectedKeys<Think<Residual>> {
  using Base = detail::ProjectedKeys<Think<Residual>>;

 public:
  static_assert(Residual > 0, "quant::Think: Residual (the whole-key window) is positive");
  // KvCache's FitsKeys protocol: the exact window, and a head is fitted at observe().
  static constexpr std::size_t residual_tokens = Residual;
  static constexpr bool fits_on_observe = true;

  Think() : Think(0.4F) {}
  explicit Think(float prune_ratio) : prune_ratio_(prune_ratio) {
    if (!(prune_ratio >= 0.0F && prune_ratio < 1.0F)) {
      kvc::detail::fail<ValueError>("{}: prune ratio {} is out of range, expected [0, 1)", name(),
                                    prune_ratio);
    }
  }

  static constexpr std::string_view name() noexcept { return "think"; }
  static constexpr float max_magnitude() noexcept { return 65504.0F; }

  float prune_ratio() const noexcept { return prune_ratio_; }
  bool supports_head_dim(std::size_t head_dim) const noexcept {
    return head_dim >= 1 && head_dim <= Base::max_projected_dim;
  }
  // r: the channels kept per key (see Format).
  std::size_t projected_dim(std::size_t head_dim) const noexcept {
    const auto pruned =
        static_cast<std::size_t>(std::floor(prune_ratio_ * static_cast<float>(head_dim)));
    const std::size_t kept = std::max<std::size_t>(head_dim - pruned, 1);
    return std::min(head_dim, (kept + 15) / 16 * 16);
  }
  std::size_t key_group_bytes(std::size_t head_dim) const noexcept {
    return projected_dim(head_dim) * sizeof(std::uint16_t);
  }

  // The r channels of highest score, ascending (see Keeps). Without queries (query_rows 0)
  // the query factor is 1 for every channel.
  void fit_keys(const KeyFit& fit, std::byte* channels_bytes) const {
    const std::size_t d = fit.head_dim;
    std::vector<double> query_energy(d, fit.query_rows == 0 ? 1.0 : 0.0);
    for (std::size_t r = 0; r < fit.query_rows; ++r) {
      for (std::size_t c = 0; c < d; ++c) {
        const double q = fit.queries[r * d + c];
        query_energy[c] += q * q;
      }
    }
    std::vector<double> key_energy(d, 0.0);
    for (std::size_t t = 0; t < fit.tokens; ++t) {
      for (std::size_t c = 0; c < d; ++c) {
        const double k = fit.keys[t * d + c];
        key_energy[c] += k * k;
      }
    }
    const double rows = static_cast<double>(std::max<std::size_t>(fit.query_rows, 1));
    const double tokens = static_cast<double>(std::max<std::size_t>(fit.tokens, 1));
    std::vector<double> score(d);
    for (std::size_t c = 0; c < d; ++c) {
      score[c] = query_energy[c] / rows * (key_energy[c] / tokens);
    }
    std::vector<std::uint16_t> order(d);
    std::iota(order.begin(), order.end(), std::uint16_t{0});
    const std::size_t kept = projected_dim(d);
    std::stable_sort(order.begin(), order.end(),
                     [&](std::uint16_t a, std::uint16_t b) { return score[a] > score[b]; });
    std::sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(kept));
    std::memcpy(channels_bytes, order.data(), kept * sizeof(std::uint16_t));
  }

  // out = the kept channels of row.
  void project_key(const float* row, std::size_t head_dim, const std::byte* channels,
                   float* out) const noexcept {
    gather(row, head_dim, channels, out);
  }

  // k̂: the kept channels, 0 elsewhere.
  void decode_key(const std::byte* codes, std::size_t head_dim, const std::byte* channels,
                  float* out) const noexcept {
    const std::size_t kept = projected_dim(head_dim);
    std::fill(out, out + head_dim, 0.0F);
    for (std::size_t j = 0; j < kept; ++j) {
      out[channel(channels, j)] = static_cast<float>(Base::stored(codes)[j]);
    }
  }

  // Each query row restricted to the kept channels.
  void project_queries(const float* queries, std::size_t rows, std::size_t head_dim,
                       const std::byte* channels, float* out) const noexcept {
    const std::size_t kept = projected_dim(head_dim);
    for (std::size_t r = 0; r < rows; ++r) {
      gather(queries + r * head_dim, head_dim, channels, out + r * kept);
    }
  }

  // The kept channel list of a fitted head (for tests and inspection).
  std::vector<std::uint16_t> channels(const std::byte* channels_bytes, std::size_t head_dim) const {
    std::vector<std::uint16_t> result(projected_dim(head_dim));
    for (std::size_t j = 0; j < result.size(); ++j) result[j] = channel(channels_bytes, j);
    return result;
  }

 private:
  static std::uint16_t channel(const std::byte* channels, std::size_t j) noexcept {
    std::uint16_t c;
    std::memcpy(&c, channels + j * sizeof(std::uint16_t), sizeof(c));
    return c;
  }

  void gather(const float* row, std::size_t head_dim, const std::byte* channels,
              float* out) const noexcept {
    const std::size_t kept = projected_dim(head_dim);
    for (std::size_t j = 0; j < kept; ++j) out[j] = row[channel(channels, j)];
  }

  float prune_ratio_;
};

}  // namespace kvc::quant
