// kvc/core/geometry.hpp — model geometry, token budgets and cache options.
#pragma once

#include <kvc/core/error.hpp>

#include <cmath>
#include <cstddef>
#include <limits>

namespace kvc {

// The attention shape of the model whose K/V the cache holds. GQA: q_heads is a multiple
// of kv_heads; each kv head is shared by group_size() query heads and stored once.
struct Geometry {
  std::size_t layers = 0;
  std::size_t q_heads = 0;
  std::size_t kv_heads = 0;
  std::size_t head_dim = 0;

  constexpr std::size_t group_size() const noexcept { return q_heads / kv_heads; }

  void validate() const {
    if (layers == 0) detail::fail<ShapeError>("Geometry: layers is 0");
    if (kv_heads == 0) detail::fail<ShapeError>("Geometry: kv_heads is 0");
    if (head_dim == 0) detail::fail<ShapeError>("Geometry: head_dim is 0");
    if (q_heads == 0 || q_heads % kv_heads != 0) {
      detail::fail<ShapeError>("Geometry: q_heads {} is not a positive multiple of kv_heads {}",
                               q_heads, kv_heads);
    }
  }

  friend constexpr bool operator==(const Geometry&, const Geometry&) = default;
};

// How many tokens each (layer, kv head) may keep. A budget is either unlimited, a fixed
// token count, or a ratio of the tokens seen so far (which grows during decode).
class Budget {
 public:
  enum class Kind { unlimited, tokens, ratio };

  constexpr Budget() noexcept = default;

  static constexpr Budget unlimited() noexcept { return Budget{}; }

  static Budget tokens(std::size_t count) {
    if (count == 0) detail::fail<BudgetError>("Budget::tokens: budget is 0 tokens");
    Budget budget;
    budget.kind_ = Kind::tokens;
    budget.tokens_ = count;
    return budget;
  }

  // Keep ceil(fraction * tokens seen) tokens (at least 1); fraction in (0, 1].
  static Budget ratio(double fraction) {
    if (!(fraction > 0.0 && fraction <= 1.0)) {
      detail::fail<BudgetError>("Budget::ratio: fraction {} is outside (0, 1]", fraction);
    }
    Budget budget;
    budget.kind_ = Kind::ratio;
    budget.ratio_ = fraction;
    return budget;
  }

  constexpr Kind kind() const noexcept { return kind_; }
  constexpr bool is_unlimited() const noexcept { return kind_ == Kind::unlimited; }
  constexpr std::size_t token_count() const noexcept { return tokens_; }
  constexpr double fraction() const noexcept { return ratio_; }

  // Tokens a head may keep after it has seen `tokens_seen` tokens.
  std::size_t resolve(std::size_t tokens_seen) const noexcept {
    switch (kind_) {
      case Kind::tokens:
        return tokens_;
      case Kind::ratio: {
        const double kept = std::ceil(ratio_ * static_cast<double>(tokens_seen));
        return kept < 1.0 ? 1 : static_cast<std::size_t>(kept);
      }
      case Kind::unlimited:
        break;
    }
    return std::numeric_limits<std::size_t>::max();
  }

 private:
  Kind kind_ = Kind::unlimited;
  std::size_t tokens_ = 0;
  double ratio_ = 1.0;
};

struct CacheOptions {
  // Tokens each (layer, kv head) keeps; the planner may redistribute it across heads.
  Budget budget = Budget::unlimited();
  // Tokens per page: the unit of allocation, copy-on-write sharing and (later) offload.
  // 64 keeps attend streaming (a page's keys are ≥ 8 KiB contiguous at head_dim 64 in
  // f16; bench/attend: 16-token pages cost ~10 % more at 32K) while wasting at most 63
  // slots per head.
  std::size_t page_tokens = 64;
  // Compress a layer to budget at the end of attend() and before append() when it is over
  // budget. Off: only an explicit compress() evicts.
  bool auto_compress = true;
  // Reject NaN/Inf in appended K/V, and values beyond what the quantizer can store (e.g.
  // |x| > 65504 for f16): one vectorized O(n·d) scan; a NaN key poisons every softmax.
  bool check_finite = true;
  // Decode-time eviction may let a head run `eviction_slack` tokens over budget before
  // compressing it back to the budget. 0 (default) evicts every step, exactly as the
  // papers specify; a slack of s amortizes the compaction (which shifts the kept tokens)
  // over s + 1 steps at the price of s extra tokens per head. compress() ignores it.
  std::size_t eviction_slack = 0;
  // For scorers that observe queries (SnapKV, CAKE, WindowKV, ...): attend() keeps the last
  // `query_buffer` query tokens of each layer (fp32, q_heads × query_buffer × head_dim
  // floats per layer and sequence, counted in stats().metadata_bytes), and every
  // compression observes them first. With eviction_slack = N this is kvpress's
  // DecodingPress: every N decode steps each layer is squeezed back to budget, scored with
  // the window of the last `query_buffer` queries, and the host never calls observe()
  // during decode. 0 (default): only the host's observe() calls feed the scorer.
  std::size_t query_buffer = 0;
};

}  // namespace kvc
