// kvc/core/stats.hpp — exact memory accounting of a cache or of one sequence.
//
// Every byte the cache holds for its tokens is in one of three buckets:
//   code bytes      the encoded K and V of the stored tokens (what the quantizer promises),
//   page bytes      whole pages in use (codes + the int32 position of each slot + the
//                   unused tail of partially filled pages + alignment padding),
//   metadata bytes  page tables, per-head policy state (e.g. H2O's accumulated scores) and
//                   per-head bookkeeping.
//   staged bytes    held outside the pages by a quantizer that GroupsKeys (KIVI) or
//                   FitsKeys (ThinK, low-rank keys): the fp32 rows of the newest tokens and
//                   the key groups' parameters or fitted bases (capacity).
// Code bytes of such a quantizer count what its stored tokens occupy: key and value codes,
// key group parameters, and the fp32 rows still waiting.
// bytes_held() = page bytes + metadata bytes + staged bytes. It is compared with what a plain fp16
// cache of every token ever appended would hold (the usual baseline of the papers).
#pragma once

#include <kvc/core/format.hpp>

#include <cstddef>
#include <string_view>
#include <vector>

namespace kvc {

struct CacheStats {
  std::string_view scorer;
  std::string_view quantizer;
  std::size_t layers = 0;
  std::size_t kv_heads = 0;
  std::size_t head_dim = 0;
  std::size_t sequences = 0;
  std::size_t tokens_seen = 0;    // Σ over sequences and layers of tokens appended (per head)
  std::size_t tokens_stored = 0;  // Σ over sequences, layers and kv heads of tokens held
  std::vector<std::size_t> tokens_per_head;  // [layer * kv_heads + kv_head], Σ over sequences
  std::size_t page_size_bytes = 0;
  std::size_t pages_in_use = 0;
  std::size_t code_bytes = 0;
  std::size_t page_bytes = 0;
  std::size_t metadata_bytes = 0;
  std::size_t staged_bytes = 0;
  std::size_t pool_reserved_bytes = 0;  // memory taken from the backend, free pages included

  std::size_t tokens(std::size_t layer, std::size_t kv_head) const {
    return tokens_per_head.at(layer * kv_heads + kv_head);
  }
  std::size_t bytes_held() const noexcept { return page_bytes + metadata_bytes + staged_bytes; }
  // What an uncompressed fp16 cache of every appended token would hold.
  std::size_t dense_f16_bytes() const noexcept { return tokens_seen * kv_heads * 2 * head_dim * 2; }
  double compression_ratio() const noexcept {
    return bytes_held() == 0
               ? 1.0
               : static_cast<double>(dense_f16_bytes()) / static_cast<double>(bytes_held());
  }
};

}  // namespace kvc

template <>
struct fmt::formatter<kvc::CacheStats> {
  constexpr auto parse(fmt::format_parse_context& context) { return context.begin(); }

  template <class FormatContext>
  auto format(const kvc::CacheStats& s, FormatContext& context) const {
    return fmt::format_to(
        context.out(),
        "kvc cache [{} + {}]: {} sequence(s), {} of {} token-heads kept, {} pages of {} B, "
        "held {} B (pages {} B + metadata {} B + staged {} B; codes {} B) vs fp16 dense {} B: "
        "{:.2f}x",
        s.scorer, s.quantizer, s.sequences, s.tokens_stored, s.tokens_seen * s.kv_heads,
        s.pages_in_use, s.page_size_bytes, s.bytes_held(), s.page_bytes, s.metadata_bytes,
        s.staged_bytes, s.code_bytes, s.dense_f16_bytes(), s.compression_ratio());
  }
};
