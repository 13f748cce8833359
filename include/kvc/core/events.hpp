// kvc/core/events.hpp — what KvCache tells its policies, and what it asks of them.
//
// Policies never see the cache itself: they get these small structs of views, valid only
// for the duration of the call. Per-head state lives in the policy's own `HeadState`,
// which the cache stores per (sequence, layer, kv head), copies on fork and compacts on
// eviction by calling the policy back.
#pragma once

#include <kvc/core/geometry.hpp>

#include <cstddef>
#include <cstdint>
#include <span>

namespace kvc {

// Absolute token position in its sequence (0 = first token ever appended to the layer).
using Position = std::int32_t;

// `count` tokens were appended at the end of one (layer, kv head) of a sequence.
struct AppendEvent {
  std::size_t layer = 0;
  std::size_t kv_head = 0;
  Position first_position = 0;
  std::size_t count = 0;
  // The new keys as fp32, [count][head_dim] (as the host gave them, before encoding);
  // filled only when a policy asks for keys (a RetrievalIndex with reads_all == false, or
  // a scorer with `wants_appended_keys`), empty otherwise.
  std::span<const float> keys{};
  std::size_t head_dim = 0;
};

// Softmax attention weights that attend() computed for one kv head: weights[i] is the
// weight of stored token i (storage order), summed over the GQA group's query heads and
// over the query tokens of the call. Each query row sums to 1, so Σ weights = query_rows.
struct AttentionEvent {
  std::size_t layer = 0;
  std::size_t kv_head = 0;
  std::span<const float> weights{};
  std::size_t query_rows = 0;
};

// Window attention from observe(): weights is [query_rows][tokens] row-major, each row the
// full softmax of one window query over *all* stored tokens (causal only inside the
// window). Row r belongs to query head (kv_head * group + r / window) and window token
// r % window. Scorers such as SnapKV reduce it as their paper says.
struct ObserveEvent {
  std::size_t layer = 0;
  std::size_t kv_head = 0;
  std::span<const float> weights{};
  std::size_t query_rows = 0;
  std::size_t window = 0;
  std::size_t tokens = 0;
};

// Asked of a scorer when a head holds more tokens than its budget.
struct ScoreContext {
  std::size_t layer = 0;
  std::size_t kv_head = 0;
  std::span<const Position> positions{};  // per stored token, ascending
  std::size_t budget = 0;                 // tokens that will survive
  std::size_t tokens_seen = 0;            // tokens ever appended to this layer
  // The stored keys decoded to fp32, [tokens][head_dim]; filled only for scorers with
  // `scores_stored_keys` (Knorm, KeyDiff, merging), empty otherwise.
  std::span<const float> keys{};
  std::size_t head_dim = 0;
};

// Asked of a budget planner before a layer is compressed (and by the over-budget check).
struct LayerPlan {
  Geometry geometry{};
  std::size_t layer = 0;
  std::size_t base_budget = 0;            // the cache budget resolved for tokens_seen
  std::size_t tokens_seen = 0;            // tokens ever appended to this layer
  std::span<const std::size_t> stored{};  // tokens held now, per kv head
  // Per kv head, the scorer's score of each stored token (storage order, NaN already
  // mapped to −inf; scores[h].size() == stored[h]). Filled only for a planner whose
  // wants_scores() is true (PlansFromScores), when the cache compresses the layer; empty
  // in the over-budget check and for every other planner.
  std::span<const std::span<const float>> scores{};
};

// Asked of a planner that plans a whole sequence at once (PlansSequence: PrefixKV): one
// LayerPlan per layer, each with its scores filled (every kv head scored).
struct SequencePlan {
  Geometry geometry{};
  std::span<const LayerPlan> layers{};
};

// Handed to a scorer that merges evicted tokens into kept ones (MergesEvicted: D2O) when a
// head is compressed: every stored token of the head decoded to fp32, and which survive.
// The scorer may rewrite the key and value rows of kept slots; it must set changed[slot]
// for each row it rewrote, and the cache re-encodes exactly those (into copy-on-write
// copies of shared pages). Rewritten rows must stay finite and within the quantizer's
// range (a weighted mean of stored rows does).
struct MergeEvent {
  std::size_t layer = 0;
  std::size_t kv_head = 0;
  std::span<float> keys{};                // [tokens][head_dim]
  std::span<float> values{};              // [tokens][head_dim]
  std::span<const std::uint32_t> kept{};  // surviving slots, ascending
  std::span<const Position> positions{};  // per stored slot
  std::size_t head_dim = 0;
  std::span<std::uint8_t> changed{};  // per stored slot, all 0 on entry
};

// One page tile handed to a quantizer's fused score kernel:
// scores[r * scores_stride + j] = queries[r] · key(j) for r < rows, j < tokens.
// The queries are fp32, [rows][head_dim] contiguous, already multiplied by 1/sqrt(d).
struct ScoreTile {
  const float* queries = nullptr;
  std::size_t rows = 0;
  const std::byte* key_codes = nullptr;  // token j's codes at key_codes + j * key_bytes
  std::size_t tokens = 0;
  std::size_t head_dim = 0;
  float* scores = nullptr;
  std::size_t scores_stride = 0;
  // page_tokens * head_dim floats the kernel may use; for a quantizer that GroupsKeys,
  // (page_tokens + rows + 2) * head_dim.
  float* scratch = nullptr;
  // true: the scores must be exact fp32 functions of the codes (no rounding of the queries,
  // as the integer paths of quant::Int8 do). observe() asks for it: it selects tokens once,
  // where precision matters more than speed.
  bool exact = false;
  // For a quantizer whose integer path rounds the query rows to int8 (Q::integer_scores):
  // the rows as simd::quantize_rows_s8 rounds them ([rows][head_dim] codes, one scale per
  // row), done once per attend block by KvCache rather than once per tile. Null: the
  // kernel rounds them itself.
  const std::int8_t* query_codes = nullptr;
  const float* query_scales = nullptr;
};

// Asked of a quantizer that FitsKeys (ThinK, low-rank keys) once per kv head: fit the
// head's key basis to its `tokens` waiting keys (fp32 rows of head_dim), and, for a
// quantizer that fits on observe(), the window's query rows (GQA group × window, scaled by
// 1/sqrt(head_dim); null and 0 otherwise).
struct KeyFit {
  const float* keys = nullptr;
  std::size_t tokens = 0;
  const float* queries = nullptr;
  std::size_t query_rows = 0;
  std::size_t head_dim = 0;
};

// acc[r * head_dim + c] += Σ_j weights[r * weights_stride + j] * value(j)[c].
struct AccumulateTile {
  const float* weights = nullptr;
  std::size_t rows = 0;
  std::size_t weights_stride = 0;
  const std::byte* value_codes = nullptr;  // token j's codes at value_codes + j * value_bytes
  std::size_t tokens = 0;
  std::size_t head_dim = 0;
  float* acc = nullptr;
  float* scratch = nullptr;
};

// Asked of a retrieval index that does not read everything: which pages of one kv head
// the queries should read. The newest page is always read in addition (it holds the
// query's own tokens).
struct SelectContext {
  std::size_t layer = 0;
  std::size_t kv_head = 0;
  const float* queries = nullptr;  // [rows][head_dim], scaled by 1/sqrt(d)
  std::size_t rows = 0;
  std::size_t head_dim = 0;
  std::size_t pages = 0;
  std::size_t page_tokens = 0;
};

// Identifies a page for an offload tier: stable across processes for one cache.
struct PageKey {
  std::uint64_t sequence = 0;
  std::uint32_t layer = 0;
  std::uint32_t kv_head = 0;
  std::uint64_t page = 0;
  friend constexpr bool operator==(const PageKey&, const PageKey&) = default;
};

}  // namespace kvc
