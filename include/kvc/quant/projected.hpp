// kvc/quant/projected.hpp — what the key-projecting formats (quant::Think,
// quant::LowRankKeys) share: KvCache's FitsKeys protocol with keys stored as r fp16 numbers
// per token in a per-head basis, and values stored whole in fp16 (quant::Dense<half> rows).
//
// A derived format supplies the basis: name(), max_magnitude(), residual_tokens,
// fits_on_observe, projected_dim(d) = r, key_group_bytes(d), fit_keys, and the map of a key
// row into its r numbers (project_key) and back (decode_key), and of query rows
// (project_queries). Scores are then dot products of the projected query rows with the
// stored fp16 rows, q'·a over r channels instead of q·k over d: simd::dot_block, which
// widens the fp16 codes in registers, as for Dense<half>.
#pragma once

#include <kvc/core/element.hpp>
#include <kvc/core/events.hpp>
#include <kvc/quant/dense.hpp>
#include <kvc/simd/kernels.hpp>

#include <Eigen/Core>

#include <array>
#include <cstddef>

namespace kvc::quant::detail {

template <class Derived>
class ProjectedKeys {
 public:
  // Both tiles are simd::dot_block / axpy_block on fp16 rows (concepts.hpp).
  static constexpr bool uniform_tile_cost = true;
  // The most numbers a key is stored as (encode_key's buffer lives on the stack).
  static constexpr std::size_t max_projected_dim = 1024;

  std::size_t key_bytes(std::size_t head_dim) const noexcept {
    return self().projected_dim(head_dim) * sizeof(Eigen::half);
  }
  std::size_t value_bytes(std::size_t head_dim) const noexcept {
    return values_.value_bytes(head_dim);
  }

  // A key row into its r fp16 numbers (each rounded to nearest even).
  void encode_key(const float* row, std::size_t head_dim, const std::byte* basis,
                  std::byte* codes) const noexcept {
    const std::size_t r = self().projected_dim(head_dim);
    std::array<float, max_projected_dim> coefficients;
    self().project_key(row, head_dim, basis, coefficients.data());
    simd::convert(coefficients.data(), reinterpret_cast<Eigen::half*>(codes), r);
  }

  // scores = projected query rows (tile.queries, r floats each) · stored rows.
  void score_tile(const ScoreTile& tile, const std::byte* /*basis*/) const noexcept {
    const std::size_t r = self().projected_dim(tile.head_dim);
    simd::dot_block(tile.queries, tile.rows, r, stored(tile.key_codes), tile.tokens, r, r,
                    tile.scores, tile.scores_stride);
  }

  template <Element S>
  void encode_value(const S* source, std::size_t head_dim, std::byte* codes) const noexcept {
    values_.encode_value(source, head_dim, codes);
  }
  void decode_value(const std::byte* codes, std::size_t head_dim, float* out) const noexcept {
    values_.decode_value(codes, head_dim, out);
  }
  void accumulate_tile(const AccumulateTile& tile) const noexcept { values_.accumulate_tile(tile); }

 protected:
  static const Eigen::half* stored(const std::byte* codes) noexcept {
    return reinterpret_cast<const Eigen::half*>(codes);
  }

 private:
  const Derived& self() const noexcept { return static_cast<const Derived&>(*this); }

  Dense<Eigen::half> values_;
};

}  // namespace kvc::quant::detail
