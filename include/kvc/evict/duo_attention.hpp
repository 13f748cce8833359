// kvc/evict/duo_attention.hpp — evict::DuoAttention: retrieval heads keep every token,
// streaming heads keep attention sinks + recent tokens; evict::HeadRoles, the roles file and
// evict::calibrate_head_roles.
//
// Papers:     Xiao et al., "DuoAttention: Efficient Long-Context LLM Inference with
//             Retrieval and Streaming Heads", 2024 (arXiv 2410.10819); Tang et al.,
//             "RazorAttention: Efficient KV Cache Compression Through Retrieval Heads",
//             2024 (arXiv 2407.15891).
// Keeps:      per (layer, kv head) role, from a HeadRoles table:
//               retrieval  every token (score +inf);
//               streaming  the first `sink` positions (+inf) and the newest tokens (score =
//                          position), i.e. StreamingLLM with `sink` sinks.
//             How many a head keeps is its planned budget. The cache keeps `budget` tokens
//             per head whatever the scores (+inf only ranks first), so the memory saving
//             needs the companion planner budget::DuoAttention (kvc/budget/duo_attention.hpp):
//             retrieval heads get their stored length (never evicted), streaming heads
//             sink + recent (64 + 256). Real ragged memory: a streaming head holds
//             sink + recent tokens in its pages, a retrieval head all of them, and stats()
//             counts exactly that. With another planner a retrieval head is cut at its
//             budget like any head (all its tokens tie at +inf: the newest survive).
// Needs:      the roles: a roles file (below), HeadRoles built in code, or
//             calibrate_head_roles on the attention of a long calibration prompt. Nothing
//             per step (no queries, no attention weights).
// Cost:       O(n) per compression of a streaming head; retrieval heads are never scored
//             under budget::DuoAttention. No per-token state.
// When:       prefill and decode (a streaming head is trimmed whenever it exceeds its budget).
// Defaults:   sink 64 (the planner's recent 256); roles HeadRoles::alternating(2) when none
//             are given (head (l, h) is retrieval when l + h is even: half of the heads, a
//             placeholder for calibrated roles, which is what recipes use).
//
// Roles file (HeadRoles::parse / load, to_string / save): UTF-8 text, one line per layer
// in layer order, one character per kv head in head order:
//     # kvc head roles: R = retrieval (keeps every token), S = streaming (sinks + recent)
//     RSRS    # layer 0
//     SSRR    # layer 1
//   'R' retrieval, 'S' streaming; '#' starts a comment to the end of the line; spaces,
//   tabs and a trailing '\r' are ignored; lines with no role are skipped. Every layer line
//   has the same number of heads. Errors: ValueError for any other character (naming line,
//   column and the character), ShapeError for a layer with a different head count (naming
//   both lines) or a file with no layer; kvc::Error when the file cannot be read or written.
//
// Calibration (calibrate_head_roles): for each (layer, kv head), the softmax attention of
// the last W queries of a long calibration prompt over all its tokens, laid out as an
// ObserveEvent ([query_rows][tokens], row r = query head r / W of the group, query at
// position tokens − W + r % W; positions 0..tokens−1, nothing evicted). A head's long-range
// mass is the mean over its rows of the weight on positions p with sink ≤ p ≤ q − recent
// (q the row's query position): what a streaming head would lose. The
// ceil(retrieval_fraction · heads) heads with the largest mass become retrieval (ties: the
// lower (layer, kv head) first), the others streaming. DuoAttention learns its gates by
// optimization on synthetic passkey data and RazorAttention picks heads by their echo and
// induction scores; this mass criterion is ALGORITHMS.md's and needs only attention
// weights the host already computes.
//
// Not done: RazorAttention's compensation token (one extra token per streaming head holding
// the mean of the dropped keys and of the dropped values). A scorer only ranks tokens; the
// cache writes no synthesized K/V, and a merged token would also need a position and a
// mask rule for attend. It would need a merge hook in KvCache::compress (as D2O/CAM would).
#pragma once

#include <kvc/core/error.hpp>
#include <kvc/core/events.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <numeric>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace kvc::evict {

enum class HeadRole : std::uint8_t { streaming, retrieval };

// The role of every (layer, kv head): a table (layers × kv_heads), or a pattern that covers
// any geometry (alternating). A head outside the table is retrieval: it keeps everything,
// so roles written for a smaller model never evict what they do not describe.
class HeadRoles {
 public:
  // An empty table: every head is retrieval.
  HeadRoles() = default;
  HeadRoles(std::size_t layers, std::size_t kv_heads, HeadRole fill = HeadRole::streaming)
      : layers_(layers), kv_heads_(kv_heads), roles_(layers * kv_heads, fill) {}

  // Head (layer, kv_head) is retrieval when (layer + kv_head) % period == 0, for any
  // geometry: period 2 is a checkerboard (half of the heads; whole layers alternate when
  // there is one kv head), period 1 makes every head retrieval.
  static HeadRoles alternating(std::size_t period) {
    if (period == 0) detail::fail<ValueError>("HeadRoles::alternating: period is 0");
    HeadRoles roles;
    roles.period_ = period;
    return roles;
  }

  std::size_t layers() const noexcept { return layers_; }
  std::size_t kv_heads() const noexcept { return kv_heads_; }
  std::size_t period() const noexcept { return period_; }  // 0 for a table
  bool is_pattern() const noexcept { return period_ != 0; }

  HeadRole role(std::size_t layer, std::size_t kv_head) const noexcept {
    if (period_ != 0) {
      return (layer + kv_head) % period_ == 0 ? HeadRole::retrieval : HeadRole::streaming;
    }
    if (layer >= layers_ || kv_head >= kv_heads_) return HeadRole::retrieval;
    return roles_[layer * kv_heads_ + kv_head];
  }
  bool retrieval(std::size_t layer, std::size_t kv_head) const noexcept {
    return role(layer, kv_head) == HeadRole::retrieval;
  }

  void set(std::size_t layer, std::size_t kv_head, HeadRole role) {
    if (period_ != 0) detail::fail<UnsupportedError>("HeadRoles::set: a pattern has no table");
    if (layer >= layers_ || kv_head >= kv_heads_) {
      detail::fail<ShapeError>("HeadRoles::set: head ({}, {}) is outside the {} × {} table", layer,
                               kv_head, layers_, kv_heads_);
    }
    roles_[layer * kv_heads_ + kv_head] = role;
  }

  // Heads of the table with `role` (a pattern: 0).
  std::size_t count(HeadRole role) const noexcept {
    return static_cast<std::size_t>(std::count(roles_.begin(), roles_.end(), role));
  }

  // This table or pattern written out as a layers × kv_heads table.
  HeadRoles table(std::size_t layers, std::size_t kv_heads) const {
    HeadRoles result(layers, kv_heads);
    for (std::size_t l = 0; l < layers; ++l) {
      for (std::size_t h = 0; h < kv_heads; ++h) result.roles_[l * kv_heads + h] = role(l, h);
    }
    return result;
  }

  // The roles file format (header comment), from text.
  static HeadRoles parse(std::string_view text) { return parse_from(text, "HeadRoles::parse"); }

  static HeadRoles load(const std::filesystem::path& path) {
    std::ifstream file(path, std::ios::binary);
    if (!file) detail::fail<Error>("HeadRoles::load: cannot open '{}'", path.string());
    std::ostringstream text;
    text << file.rdbuf();
    if (file.bad()) detail::fail<Error>("HeadRoles::load: cannot read '{}'", path.string());
    return parse_from(text.str(), fmt::format("HeadRoles::load: '{}'", path.string()));
  }

  // The roles file text: a comment line, then one line per layer. A pattern has no size:
  // write table(layers, kv_heads) instead (UnsupportedError).
  std::string to_string() const {
    if (period_ != 0) {
      detail::fail<UnsupportedError>(
          "HeadRoles::to_string: alternating({}) is a pattern; write table(layers, kv_heads)",
          period_);
    }
    std::string text = fmt::format(
        "# kvc head roles: {} layers x {} kv heads; R = retrieval (keeps every token), "
        "S = streaming (sinks + recent)\n",
        layers_, kv_heads_);
    for (std::size_t l = 0; l < layers_; ++l) {
      for (std::size_t h = 0; h < kv_heads_; ++h) {
        text += roles_[l * kv_heads_ + h] == HeadRole::retrieval ? 'R' : 'S';
      }
      text += '\n';
    }
    return text;
  }

  void save(const std::filesystem::path& path) const {
    const std::string text = to_string();
    std::ofstream file(path, std::ios::binary | std::ios::trunc);
    if (!file) detail::fail<Error>("HeadRoles::save: cannot open '{}'", path.string());
    file.write(text.data(), static_cast<std::streamsize>(text.size()));
    file.close();
    if (!file) detail::fail<Error>("HeadRoles::save: cannot write '{}'", path.string());
  }

  friend bool operator==(const HeadRoles&, const HeadRoles&) = default;

 private:
  static HeadRoles parse_from(std::string_view text, const std::string& where) {
    HeadRoles roles;
    std::size_t line_number = 0, first_line = 0;
    while (!text.empty()) {
      ++line_number;
      const std::size_t newline = text.find('\n');
      std::string_view line = text.substr(0, newline);
      text.remove_prefix(newline == std::string_view::npos ? text.size() : newline + 1);
      std::size_t heads = 0;
      for (std::size_t column = 0; column < line.size(); ++column) {
        const char c = line[column];
        if (c == '#') break;
        if (c == ' ' || c == '\t' || (c == '\r' && column + 1 == line.size())) continue;
        if (c != 'R' && c != 'S') {
          const auto byte = static_cast<unsigned char>(c);
          const std::string shown = byte >= 0x20 && byte < 0x7F
                                        ? fmt::format("'{}'", c)
                                        : fmt::format("byte 0x{:02x}", byte);
          detail::fail<ValueError>(
              "{}: line {}, column {}: {} is not a role; expected 'R' (retrieval), 'S' "
              "(streaming), '#' (comment) or a space",
              where, line_number, column + 1, shown);
        }
        roles.roles_.push_back(c == 'R' ? HeadRole::retrieval : HeadRole::streaming);
        ++heads;
      }
      if (heads == 0) continue;
      if (roles.layers_ == 0) {
        roles.kv_heads_ = heads;
        first_line = line_number;
      } else if (heads != roles.kv_heads_) {
        detail::fail<ShapeError>("{}: line {} has {} kv heads, line {} (layer 0) has {}", where,
                                 line_number, heads, first_line, roles.kv_heads_);
      }
      ++roles.layers_;
    }
    if (roles.layers_ == 0) {
      detail::fail<ShapeError>("{}: no layer line (one line of R/S per layer)", where);
    }
    return roles;
  }

  std::size_t layers_ = 0;
  std::size_t kv_heads_ = 0;
  std::size_t period_ = 0;
  std::vector<HeadRole> roles_;  // [layer][kv_head]
};

class DuoAttention {
 public:
  struct Options {
    std::size_t sink = 64;  // first positions a streaming head keeps
  };
  struct HeadState {};
  static constexpr bool evicts = true;
  static constexpr std::string_view name() noexcept { return "duo_attention"; }

  DuoAttention() = default;
  explicit DuoAttention(HeadRoles roles) : roles_(std::move(roles)) {}
  DuoAttention(HeadRoles roles, Options options) : roles_(std::move(roles)), options_(options) {}
  const HeadRoles& roles() const noexcept { return roles_; }
  const Options& options() const noexcept { return options_; }

  void on_append(HeadState&, const AppendEvent&) const noexcept {}

  void score(const HeadState&, const ScoreContext& context,
             std::span<float> scores) const noexcept {
    constexpr float keep = std::numeric_limits<float>::infinity();
    if (roles_.retrieval(context.layer, context.kv_head)) {
      std::fill(scores.begin(), scores.end(), keep);
      return;
    }
    const auto sink = static_cast<Position>(options_.sink);
    for (std::size_t i = 0; i < scores.size(); ++i) {
      const Position position = context.positions[i];
      scores[i] = position < sink ? keep : static_cast<float>(position);
    }
  }

  void on_compact(HeadState&, std::span<const std::uint32_t>) const noexcept {}

 private:
  HeadRoles roles_ = HeadRoles::alternating(2);
  Options options_{};
};

// ---- calibration -------------------------------------------------------------------------

struct CalibrationOptions {
  std::size_t sink = 64;            // as the streaming heads will keep them
  std::size_t recent = 256;         //
  double retrieval_fraction = 0.5;  // share of all (layer, kv head) made retrieval, in [0, 1]
};

// Mean over the event's rows of the attention weight on positions p with
// sink ≤ p ≤ q − recent, q = the row's query position (tokens − window + r % window).
inline double long_range_mass(const ObserveEvent& event, std::size_t sink, std::size_t recent) {
  if (event.window == 0 || event.query_rows == 0 || event.query_rows % event.window != 0 ||
      event.window > event.tokens || event.weights.size() != event.query_rows * event.tokens) {
    detail::fail<ShapeError>(
        "long_range_mass: layer {} kv head {}: {} weights for {} rows × {} tokens, window {} "
        "(rows must be a multiple of the window, the window at most the tokens)",
        event.layer, event.kv_head, event.weights.size(), event.query_rows, event.tokens,
        event.window);
  }
  double total = 0.0;
  for (std::size_t r = 0; r < event.query_rows; ++r) {
    const std::size_t query = event.tokens - event.window + r % event.window;
    if (query < recent) continue;  // every visible token is recent
    const std::size_t last = query - recent;
    const float* row = event.weights.data() + r * event.tokens;
    for (std::size_t p = sink; p <= last; ++p) total += row[p];
  }
  return total / static_cast<double>(event.query_rows);
}

// Roles from the attention of a calibration prompt (header comment): one event per
// (layer, kv head), in any order.
inline HeadRoles calibrate_head_roles(std::span<const ObserveEvent> heads, std::size_t layers,
                                      std::size_t kv_heads, CalibrationOptions options = {}) {
  if (!(options.retrieval_fraction >= 0.0 && options.retrieval_fraction <= 1.0)) {
    detail::fail<ValueError>("calibrate_head_roles: retrieval_fraction {} is outside [0, 1]",
                             options.retrieval_fraction);
  }
  if (layers == 0 || kv_heads == 0) {
    detail::fail<ShapeError>("calibrate_head_roles: {} layers × {} kv heads", layers, kv_heads);
  }
  const std::size_t total = layers * kv_heads;
  if (heads.size() != total) {
    detail::fail<ShapeError>("calibrate_head_roles: {} events for {} layers × {} kv heads",
                             heads.size(), layers, kv_heads);
  }
  std::vector<double> mass(total, 0.0);
  std::vector<bool> seen(total, false);
  for (const ObserveEvent& event : heads) {
    if (event.layer >= layers || event.kv_head >= kv_heads) {
      detail::fail<ShapeError>("calibrate_head_roles: event for head ({}, {}) outside {} × {}",
                               event.layer, event.kv_head, layers, kv_heads);
    }
    const std::size_t slot = event.layer * kv_heads + event.kv_head;
    if (seen[slot]) {
      detail::fail<ShapeError>("calibrate_head_roles: two events for layer {} kv head {}",
                               event.layer, event.kv_head);
    }
    seen[slot] = true;
    mass[slot] = long_range_mass(event, options.sink, options.recent);
    if (!std::isfinite(mass[slot])) {
      detail::fail<ValueError>("calibrate_head_roles: layer {} kv head {}: the weights sum to {}",
                               event.layer, event.kv_head, mass[slot]);
    }
  }
  std::vector<std::size_t> order(total);
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](std::size_t a, std::size_t b) { return mass[a] > mass[b]; });
  const auto retrieval = static_cast<std::size_t>(
      std::ceil(options.retrieval_fraction * static_cast<double>(total) - 1e-9));
  HeadRoles roles(layers, kv_heads, HeadRole::streaming);
  for (std::size_t i = 0; i < std::min(retrieval, total); ++i) {
    roles.set(order[i] / kv_heads, order[i] % kv_heads, HeadRole::retrieval);
  }
  return roles;
}

}  // namespace kvc::evict
