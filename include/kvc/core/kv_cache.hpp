// kvc/core/kv_cache.hpp — KvCache: the policies composed into one cache a host loop embeds.
//
//   KvCache<Scorer, Quantizer, Index, Offload, Planner, Backend>
//
// Storage: per (sequence, layer, kv head) a ragged list of pages from one pool, so a
// head's budget is real memory, not a mask. A page holds `page_tokens` slots:
//   [key codes × P][pad to 64][value codes × P][pad to 64][int32 position × P][pad to 64]
// and, for a quantizer that GroupsKeys (KIVI) or FitsKeys (ThinK, low-rank keys),
// [uint32 key group × P][pad to 64]; such a head also keeps its newest tokens in fp32
// outside the pages until the quantizer takes them.
// Slots are kept in ascending position order (eviction compacts stably), which makes the
// causal mask of a query chunk a per-row prefix length.
//
// Host protocol, per layer (after RoPE):
//   append(seq, layer, k, v)      prefill chunk or decode token, [kv_heads][n][head_dim]
//   observe(seq, layer, q_window) optional: window queries for query-aware scorers
//   attend(seq, layer, q, out)    n ≥ 1 queries = the last n appended positions, causal
// With auto_compress, a layer over budget is compressed at the end of attend() (after the
// scorer saw that step's attention) and, for hosts that never call attend, at the start of
// the next append(). compress(seq) does it explicitly.
//
// Errors: every check runs before the first write; a rejected call leaves the cache as it
// was. Thread safety: one KvCache is used by one thread at a time (attend uses scratch
// buffers owned by the cache); distinct caches are independent.
#pragma once

#include <kvc/backend/cpu.hpp>
#include <kvc/budget/uniform.hpp>
#include <kvc/core/concepts.hpp>
#include <kvc/core/element.hpp>
#include <kvc/core/error.hpp>
#include <kvc/core/events.hpp>
#include <kvc/core/geometry.hpp>
#include <kvc/core/page_pool.hpp>
#include <kvc/core/stats.hpp>
#include <kvc/core/view.hpp>
#include <kvc/evict/full.hpp>
#include <kvc/offload/none.hpp>
#include <kvc/quant/dense.hpp>
#include <kvc/retrieval/exhaustive.hpp>
#include <kvc/simd/int8_dot.hpp>
#include <kvc/simd/kernels.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

namespace kvc {

namespace detail {
// The planner's per-sequence state, or nothing.
struct NoSequenceState {};
template <class Planner>
struct sequence_state {
  using type = NoSequenceState;
};
template <HasSequenceState Planner>
struct sequence_state<Planner> {
  using type = typename Planner::SequenceState;
};

// A kv head's full-precision tail and key-group parameters, for a quantizer that GroupsKeys
// (KIVI) or FitsKeys (one group: the head's fitted basis, none before the fit).
// Slots [0, keys_encoded) hold key codes (each with its group id in the page),
// the later ones wait as fp32 rows in `keys`; likewise values, whose rows start at row
// `values_front` of `values` (the window slides one row per token; the dead rows in front
// are dropped every key_group_tokens steps, not every step).
struct KeyGroupStaging {
  std::size_t keys_encoded = 0;
  std::size_t values_encoded = 0;
  std::size_t values_front = 0;
  std::vector<float> keys;
  std::vector<float> values;
  std::vector<std::byte> groups;  // key_group_bytes per group, in slot order
};
struct NoStaging {};
template <class Quant>
using staging_t =
    std::conditional_t<GroupsKeys<Quant> || FitsKeys<Quant>, KeyGroupStaging, NoStaging>;
}  // namespace detail

// A handle to one sequence of a cache. The generation makes a handle to a closed (and
// possibly reused) slot detectable.
struct SequenceId {
  std::uint32_t slot = 0;
  std::uint32_t generation = 0;
  friend constexpr bool operator==(const SequenceId&, const SequenceId&) = default;
};

// export_dense(): one layer of one sequence decoded to fp32, per kv head.
struct DenseLayer {
  using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  std::vector<Matrix> keys;                      // [kv_head] → tokens × head_dim
  std::vector<Matrix> values;                    // [kv_head] → tokens × head_dim
  std::vector<std::vector<Position>> positions;  // [kv_head] → tokens
};

template <EvictionScorer Scorer = evict::Full, Quantizer Quant = quant::Dense<float>,
          RetrievalIndex Index = retrieval::Exhaustive, OffloadBackend Offload = offload::None,
          BudgetPlanner Planner = budget::Uniform, ComputeBackend Backend = backend::Cpu>
class KvCache {
 public:
  using scorer_type = Scorer;
  using quantizer_type = Quant;
  using index_type = Index;
  using offload_type = Offload;
  using planner_type = Planner;
  using backend_type = Backend;

  explicit KvCache(Geometry geometry, CacheOptions options = {}, Scorer scorer = {},
                   Quant quantizer = {}, Index index = {}, Offload offload = {},
                   Planner planner = {}, Backend backend = {})
      : geometry_(checked(geometry, options, quantizer)),
        options_(options),
        scorer_(std::move(scorer)),
        quantizer_(std::move(quantizer)),
        index_(std::move(index)),
        offload_(std::move(offload)),
        planner_(std::move(planner)),
        key_bytes_(quantizer_.key_bytes(geometry_.head_dim)),
        value_bytes_(quantizer_.value_bytes(geometry_.head_dim)),
        value_offset_(round_up(options_.page_tokens * key_bytes_)),
        position_offset_(value_offset_ + round_up(options_.page_tokens * value_bytes_)),
        group_offset_(position_offset_ + round_up(options_.page_tokens * sizeof(Position))),
        pool_(group_offset_ + (grouped ? round_up(options_.page_tokens * sizeof(GroupId)) : 0),
              std::move(backend)) {
    if constexpr (grouped) key_group_bytes_ = quantizer_.key_group_bytes(geometry_.head_dim);
  }

  KvCache(const KvCache&) = delete;
  KvCache& operator=(const KvCache&) = delete;

  const Geometry& geometry() const noexcept { return geometry_; }
  const CacheOptions& options() const noexcept { return options_; }
  Scorer& scorer() noexcept { return scorer_; }
  const Quant& quantizer() const noexcept { return quantizer_; }
  Planner& planner() noexcept { return planner_; }
  Index& index() noexcept { return index_; }
  Offload& offload() noexcept { return offload_; }

  // ---- sequences ------------------------------------------------------------------------

  SequenceId open_sequence() {
    const std::uint32_t slot = free_slot();
    Sequence& sequence = sequences_[slot];
    Layer empty;
    empty.heads.resize(geometry_.kv_heads);
    sequence.layers.assign(geometry_.layers, empty);
    sequence.open = true;
    return {slot, sequence.generation};
  }

  // A new sequence sharing every page of `parent` copy-on-write: no K/V is copied until
  // one of the two writes to a shared page.
  SequenceId fork(SequenceId parent) {
    const Sequence& source = checked(parent, "fork");
    std::vector<Layer> layers = source.layers;  // may throw: nothing changed yet
    PlannerState planner_state = source.planner_state;
    const std::optional<Budget> budget = source.budget;
    const std::uint32_t slot = free_slot();
    Sequence& child = sequences_[slot];
    child.layers = std::move(layers);
    child.planner_state = std::move(planner_state);
    child.budget = budget;
    child.open = true;
    for (const Layer& layer : child.layers) {
      for (const Head& head : layer.heads) {
        for (PageId page : head.pages) pool_.retain(page);
      }
    }
    return {slot, child.generation};
  }

  // Frees every page the sequence alone holds; the handle becomes invalid.
  void close(SequenceId id) {
    Sequence& sequence = checked(id, "close");
    for (Layer& layer : sequence.layers) {
      for (Head& head : layer.heads) {
        for (PageId page : head.pages) pool_.release(page);
      }
    }
    sequence.layers = {};
    sequence.planner_state = {};
    sequence.budget.reset();
    sequence.open = false;
    ++sequence.generation;
    free_slots_.push_back(id.slot);
  }

  bool is_open(SequenceId id) const noexcept {
    return id.slot < sequences_.size() && sequences_[id.slot].open &&
           sequences_[id.slot].generation == id.generation;
  }

  std::size_t sequence_count() const noexcept { return sequences_.size() - free_slots_.size(); }

  // A budget for this sequence alone, in place of options().budget (forks inherit it). It
  // takes effect at the sequence's next compression: the next over-budget append/attend
  // with auto_compress, or compress().
  void set_budget(SequenceId id, Budget budget) {
    Sequence& sequence = checked(id, "set_budget");
    if (!Scorer::evicts && !budget.is_unlimited()) {
      detail::fail<BudgetError>(
          "set_budget: sequence {} gets a budget but scorer '{}' never evicts", id.slot,
          Scorer::name());
    }
    sequence.budget = budget;
  }

  // The budget this sequence is compressed to: its own, else the cache's.
  Budget budget(SequenceId id) const { return budget_of(checked(id, "budget")); }

  // ---- append ---------------------------------------------------------------------------

  // Stores n new tokens at the end of `layer`: k and v are [kv_heads][n][head_dim].
  template <class T>
    requires Element<std::remove_const_t<T>>
  void append(SequenceId id, std::size_t layer, View<T, 3> k, View<T, 3> v) {
    using E = std::remove_const_t<T>;
    Sequence& sequence = checked(id, "append");
    check_layer(layer, "append");
    check_heads_view(k, geometry_.kv_heads, "append", "k", "kv heads");
    check_heads_view(v, geometry_.kv_heads, "append", "v", "kv heads");
    if (k.extent(1) != v.extent(1)) {
      detail::fail<ShapeError>("append: k has {} tokens, v has {}", k.extent(1), v.extent(1));
    }
    const std::size_t count = k.extent(1);
    if (count == 0) return;
    if (options_.check_finite) {
      check_finite(k, "append", "k");
      check_finite(v, "append", "v");
    }
    Layer& store = sequence.layers[layer];
    if (store.tokens_seen + count >
        static_cast<std::size_t>(std::numeric_limits<Position>::max())) {
      detail::fail<Error>("append: layer {} would hold position {}, past the int32 limit", layer,
                          store.tokens_seen + count);
    }

    if (options_.auto_compress && over_budget(sequence, layer)) compress_layer(sequence, layer);

    // Reserve every page and buffer first: after this point nothing below can throw.
    std::size_t pages_needed = 0;
    for (const Head& head : store.heads) {
      pages_needed += pages_for(head.tokens + count) - head.pages.size();
      pages_needed += shared_pages_from(head, first_written_slot(head));
    }
    pool_.reserve(pages_needed);
    for (Head& head : store.heads) {
      head.pages.reserve(pages_for(head.tokens + count));
      if constexpr (grouped) reserve_staging(head, count);
    }

    const auto first_position = static_cast<Position>(store.tokens_seen);
    for (std::size_t h = 0; h < geometry_.kv_heads; ++h) {
      Head& head = store.heads[h];
      if (head.tokens % options_.page_tokens != 0) {
        head.pages.back() = pool_.make_unique(head.pages.back());
      }
      for (std::size_t t = 0; t < count; ++t) {
        const std::size_t slot = head.tokens + t;
        if (slot % options_.page_tokens == 0) head.pages.push_back(pool_.acquire());
        std::byte* page = pool_.data(head.pages.back());
        const std::size_t in_page = slot % options_.page_tokens;
        const Position position = first_position + static_cast<Position>(t);
        std::memcpy(page + position_offset_ + in_page * sizeof(Position), &position,
                    sizeof(Position));
        if constexpr (grouped) {
          stage_token(head, static_cast<const E*>(k.pointer(h, t)),
                      static_cast<const E*>(v.pointer(h, t)));
        } else {
          quantizer_.encode_key(static_cast<const E*>(k.pointer(h, t)), geometry_.head_dim,
                                page + in_page * key_bytes_);
          quantizer_.encode_value(static_cast<const E*>(v.pointer(h, t)), geometry_.head_dim,
                                  page + value_offset_ + in_page * value_bytes_);
        }
      }
      AppendEvent event{layer, h, first_position, count, {}, geometry_.head_dim};
      if constexpr (!Index::reads_all || WantsAppendedKeys<Scorer>) {
        widen_keys(k, h, count);
        event.keys = std::span<const float>(key_scratch_.data(), count * geometry_.head_dim);
      }
      if constexpr (!Index::reads_all) index_.on_append(head.index_state, event);
      scorer_.on_append(head.scorer_state, event);
      head.tokens += count;
    }
    store.tokens_seen += count;
    // FitsKeys: a head's basis is fitted to the first append that leaves more than the
    // window waiting (the prefill). The tokens are stored by now: a fit that cannot allocate
    // throws with its head (and the later ones) still unfitted, their keys in fp32.
    if constexpr (fitted && !fits_on_observe()) {
      for (Head& head : store.heads) fit_head(head, nullptr, 0);
    }
  }

  // ---- observe --------------------------------------------------------------------------

  // Hands the softmax of the last w queries ([q_heads][w][head_dim], the last w appended
  // positions) over all stored keys to a scorer that observes queries (SnapKV & co.).
  // With any other scorer it only validates its input.
  template <class T>
    requires Element<std::remove_const_t<T>>
  void observe(SequenceId id, std::size_t layer, View<T, 3> q_window) {
    Sequence& sequence = checked(id, "observe");
    check_layer(layer, "observe");
    Layer& store = sequence.layers[layer];
    check_queries(q_window, store, "observe");
    if constexpr (fits_on_observe()) {
      if (options_.check_finite) check_finite_queries(q_window, "observe");
    }
    observe_window(sequence, layer, q_window, store.tokens_seen);
    // FitsKeys with fits_on_observe (ThinK): each head not yet fitted fits to its waiting
    // keys and these window queries.
    if constexpr (fits_on_observe()) {
      const std::size_t rows = geometry_.group_size() * q_window.extent(1);
      for (std::size_t h = 0; h < geometry_.kv_heads; ++h) {
        Head& head = store.heads[h];
        if (!head.staging.groups.empty()) continue;
        load_queries(q_window, h, 0, q_window.extent(1));
        fit_head(head, queries_.data(), rows);
      }
    }
  }

  // ---- attend ---------------------------------------------------------------------------

  // Decode/prefill attention on the stored (compressed) pages. q and out are
  // [q_heads][n][head_dim]; query t sits at position tokens_seen − n + t and sees stored
  // tokens at positions ≤ its own. Online softmax in one pass over the pages; each page is
  // read once per GQA group (and per block of 16 query tokens for long chunks).
  template <class TQ, class TO>
    requires Element<std::remove_const_t<TQ>> && Element<TO>
  void attend(SequenceId id, std::size_t layer, View<TQ, 3> q, View<TO, 3> out) {
    Sequence& sequence = checked(id, "attend");
    check_layer(layer, "attend");
    Layer& store = sequence.layers[layer];
    check_queries(q, store, "attend");
    if (options_.check_finite) check_finite_queries(q);
    check_heads_view(out, geometry_.q_heads, "attend", "out", "query heads");
    if (out.extent(1) != q.extent(1)) {
      detail::fail<ShapeError>("attend: out has {} tokens, q has {}", out.extent(1), q.extent(1));
    }
    const std::size_t count = q.extent(1);
    for (std::size_t h = 0; h < geometry_.kv_heads; ++h) {
      Head& head = store.heads[h];
      if constexpr (ConsumesAttention<Scorer>) head_weights_.assign(head.tokens, 0.0F);
      for (std::size_t t0 = 0; t0 < count; t0 += query_block) {
        attend_block(store, head, layer, h, q, out, t0, std::min(query_block, count - t0));
      }
      if constexpr (ConsumesAttention<Scorer>) {
        scorer_.on_attention(head.scorer_state, AttentionEvent{layer, h, head_weights_,
                                                               count * geometry_.group_size()});
      }
    }
    if constexpr (ObservesQueries<Scorer>) {
      if (options_.query_buffer > 0) buffer_queries(store, q);
    }
    if (options_.auto_compress) {
      if (over_budget(sequence, layer)) {
        compress_layer(sequence, layer);
      } else {
        cascade(sequence, layer);
      }
    }
  }

  // ---- compression ----------------------------------------------------------------------

  // Compresses every layer to budget (a planner with PlansSequence plans them together).
  void compress(SequenceId id) {
    Sequence& sequence = checked(id, "compress");
    if constexpr (Scorer::evicts && PlansSequence<Planner>) {
      compress_sequence(sequence);
    } else {
      for (std::size_t layer = 0; layer < geometry_.layers; ++layer) {
        compress_layer(sequence, layer);
      }
    }
  }

  void compress(SequenceId id, std::size_t layer) {
    Sequence& sequence = checked(id, "compress");
    check_layer(layer, "compress");
    compress_layer(sequence, layer);
  }

  // Drops every token at position ≥ `length` from every layer, and the next append
  // continues at position `length`: rollback of rejected speculative tokens (llama.cpp's
  // seq_rm(seq, length, -1)). Pages past the new end return to the pool. Scorer state of
  // the surviving tokens is kept as is (H2O keeps the attention the rejected queries paid).
  void truncate(SequenceId id, std::size_t length) {
    Sequence& sequence = checked(id, "truncate");
    for (std::size_t layer = 0; layer < geometry_.layers; ++layer) {
      if (length > sequence.layers[layer].tokens_seen) {
        detail::fail<ShapeError>("truncate: length {} is past the {} tokens layer {} has seen",
                                 length, sequence.layers[layer].tokens_seen, layer);
      }
    }
    for (Layer& store : sequence.layers) {
      for (Head& head : store.heads) {
        std::size_t kept = head.tokens;
        while (kept > 0 && static_cast<std::size_t>(position_at(head, kept - 1)) >= length) --kept;
        if (kept == head.tokens) continue;
        kept_.resize(kept);
        for (std::size_t slot = 0; slot < kept; ++slot)
          kept_[slot] = static_cast<std::uint32_t>(slot);
        compact(head);  // a prefix: nothing moves, the tail pages are released
        scorer_.on_compact(head.scorer_state, kept_);
        if constexpr (!Index::reads_all) index_.on_compact(head.index_state, kept_);
      }
      store.tokens_seen = length;
      store.buffered_queries = 0;  // their positions may be gone
    }
  }

  // ---- inspection -----------------------------------------------------------------------

  std::size_t tokens(SequenceId id, std::size_t layer, std::size_t kv_head) const {
    const Sequence& sequence = checked(id, "tokens");
    check_layer(layer, "tokens");
    check_kv_head(kv_head, "tokens");
    return sequence.layers[layer].heads[kv_head].tokens;
  }

  std::size_t tokens_seen(SequenceId id, std::size_t layer) const {
    const Sequence& sequence = checked(id, "tokens_seen");
    check_layer(layer, "tokens_seen");
    return sequence.layers[layer].tokens_seen;
  }

  std::vector<Position> positions(SequenceId id, std::size_t layer, std::size_t kv_head) const {
    const Sequence& sequence = checked(id, "positions");
    check_layer(layer, "positions");
    check_kv_head(kv_head, "positions");
    const Head& head = sequence.layers[layer].heads[kv_head];
    std::vector<Position> result(head.tokens);
    for (std::size_t slot = 0; slot < head.tokens; ++slot) result[slot] = position_at(head, slot);
    return result;
  }

  const typename Scorer::HeadState& scorer_state(SequenceId id, std::size_t layer,
                                                 std::size_t kv_head) const {
    const Sequence& sequence = checked(id, "scorer_state");
    check_layer(layer, "scorer_state");
    check_kv_head(kv_head, "scorer_state");
    return sequence.layers[layer].heads[kv_head].scorer_state;
  }

  // The planner's state for one sequence (CAKE's layer preferences, PrefixKV's split).
  const auto& planner_state(SequenceId id) const requires HasSequenceState<Planner> {
    return checked(id, "planner_state").planner_state;
  }

  // The stored K/V of one layer decoded to fp32, for hosts that bring their own kernel.
  DenseLayer export_dense(SequenceId id, std::size_t layer) const {
    const Sequence& sequence = checked(id, "export_dense");
    check_layer(layer, "export_dense");
    DenseLayer result;
    const std::size_t d = geometry_.head_dim;
    for (const Head& head : sequence.layers[layer].heads) {
      DenseLayer::Matrix keys(static_cast<Eigen::Index>(head.tokens), static_cast<Eigen::Index>(d));
      DenseLayer::Matrix values(static_cast<Eigen::Index>(head.tokens),
                                static_cast<Eigen::Index>(d));
      std::vector<Position> positions(head.tokens);
      for (std::size_t slot = 0; slot < head.tokens; ++slot) {
        decode_key_at(head, slot, keys.data() + slot * d);
        decode_value_at(head, slot, values.data() + slot * d);
        positions[slot] = position_at(head, slot);
      }
      result.keys.push_back(std::move(keys));
      result.values.push_back(std::move(values));
      result.positions.push_back(std::move(positions));
    }
    return result;
  }

  CacheStats stats() const {
    CacheStats result = empty_stats();
    for (const Sequence& sequence : sequences_) {
      if (sequence.open) add_sequence(result, sequence);
    }
    result.pages_in_use = pool_.pages_in_use();
    result.page_bytes = result.pages_in_use * pool_.page_bytes();
    return result;
  }

  // One sequence: pages it shares with a fork count in full here.
  CacheStats stats(SequenceId id) const {
    const Sequence& sequence = checked(id, "stats");
    CacheStats result = empty_stats();
    add_sequence(result, sequence);
    for (const Layer& layer : sequence.layers) {
      for (const Head& head : layer.heads) result.pages_in_use += head.pages.size();
    }
    result.page_bytes = result.pages_in_use * pool_.page_bytes();
    return result;
  }

  std::size_t bytes_per_token() const noexcept { return key_bytes_ + value_bytes_; }
  std::size_t page_bytes() const noexcept { return pool_.page_bytes(); }

 private:
  // Query tokens attended together: the rows (group × block) share every page read, and
  // the per-row score tiles stay within L1/L2.
  static constexpr std::size_t query_block = 16;
  static constexpr std::size_t page_alignment = 64;

  struct Head {
    std::vector<PageId> pages;
    std::size_t tokens = 0;
    typename Scorer::HeadState scorer_state{};
    typename Index::HeadState index_state{};
    [[no_unique_address]] detail::staging_t<Quant> staging{};
  };
  using PlannerState = typename detail::sequence_state<Planner>::type;

  struct Layer {
    std::vector<Head> heads;
    std::size_t tokens_seen = 0;
    // CacheOptions::query_buffer: the last queries attend() saw, a ring of
    // [q_heads][query_buffer][head_dim] fp32 (allocated on first use), the newest at
    // position tokens_seen − 1 when buffered_queries > 0.
    std::vector<float> query_ring{};
    std::size_t buffered_queries = 0;
    std::size_t ring_next = 0;  // ring row the next query goes to
  };
  struct SequenceCore {
    std::vector<Layer> layers;
    std::optional<Budget> budget{};
    std::uint32_t generation = 0;
    bool open = false;
  };
  struct Sequence : SequenceCore {
    [[no_unique_address]] PlannerState planner_state{};
  };

  // What the planner's state of one sequence holds (0 without one).
  std::size_t planner_state_bytes(const Sequence& sequence) const {
    if constexpr (ReportsSequenceStateBytes<Planner>) {
      return planner_.state_bytes(sequence.planner_state);
    } else if constexpr (HasSequenceState<Planner>) {
      return sizeof(PlannerState);
    } else {
      (void)sequence;
      return 0;
    }
  }

  const Budget& budget_of(const Sequence& sequence) const noexcept {
    return sequence.budget ? *sequence.budget : options_.budget;
  }

  static std::size_t round_up(std::size_t bytes) noexcept {
    return (bytes + page_alignment - 1) / page_alignment * page_alignment;
  }

  static Geometry checked(const Geometry& geometry, const CacheOptions& options,
                          const Quant& quantizer) {
    geometry.validate();
    if (options.page_tokens == 0) detail::fail<ShapeError>("KvCache: page_tokens is 0");
    if (!quantizer.supports_head_dim(geometry.head_dim)) {
      detail::fail<UnsupportedError>("KvCache: quantizer '{}' does not support head_dim {}",
                                     Quant::name(), geometry.head_dim);
    }
    if (!Scorer::evicts && !options.budget.is_unlimited()) {
      detail::fail<BudgetError>(
          "KvCache: a budget is set but scorer '{}' never evicts; choose an evicting scorer or "
          "Budget::unlimited()",
          Scorer::name());
    }
    return geometry;
  }

  std::uint32_t free_slot() {
    if (!free_slots_.empty()) {
      const std::uint32_t slot = free_slots_.back();
      free_slots_.pop_back();
      return slot;
    }
    sequences_.emplace_back();
    return static_cast<std::uint32_t>(sequences_.size() - 1);
  }

  Sequence& checked(SequenceId id, const char* function) {
    return const_cast<Sequence&>(std::as_const(*this).checked(id, function));
  }
  const Sequence& checked(SequenceId id, const char* function) const {
    if (id.slot >= sequences_.size()) {
      detail::fail<SequenceError>("{}: sequence {} was never opened ({} slots)", function, id.slot,
                                  sequences_.size());
    }
    const Sequence& sequence = sequences_[id.slot];
    if (!sequence.open || sequence.generation != id.generation) {
      detail::fail<SequenceError>("{}: sequence {} (generation {}) is closed", function, id.slot,
                                  id.generation);
    }
    return sequence;
  }

  void check_layer(std::size_t layer, const char* function) const {
    if (layer >= geometry_.layers) {
      detail::fail<ShapeError>("{}: layer {} out of range, cache has {} layers", function, layer,
                               geometry_.layers);
    }
  }
  void check_kv_head(std::size_t kv_head, const char* function) const {
    if (kv_head >= geometry_.kv_heads) {
      detail::fail<ShapeError>("{}: kv head {} out of range, cache has {} kv heads", function,
                               kv_head, geometry_.kv_heads);
    }
  }

  template <class T>
  void check_heads_view(const View<T, 3>& view, std::size_t heads, const char* function,
                        const char* argument, const char* what) const {
    if (view.extent(0) != heads) {
      detail::fail<ShapeError>("{}: {} has {} {}, cache has {}", function, argument, view.extent(0),
                               what, heads);
    }
    if (view.extent(2) != geometry_.head_dim) {
      detail::fail<ShapeError>("{}: {} has head_dim {}, cache has {}", function, argument,
                               view.extent(2), geometry_.head_dim);
    }
    if (view.extent(1) > 0 && view.stride(2) != 1) {
      detail::fail<ShapeError>("{}: {} has head_dim stride {}, kvc needs 1 (contiguous)", function,
                               argument, view.stride(2));
    }
    if (view.extent(1) > 0 && view.data() == nullptr) {
      detail::fail<ShapeError>("{}: {} has {} tokens but no data", function, argument,
                               view.extent(1));
    }
  }

  template <class T>
  void check_queries(const View<T, 3>& q, const Layer& store, const char* function) const {
    check_heads_view(q, geometry_.q_heads, function, "q", "query heads");
    if (q.extent(1) == 0) detail::fail<ShapeError>("{}: q has 0 tokens", function);
    if (q.extent(1) > store.tokens_seen) {
      detail::fail<ShapeError>(
          "{}: q has {} tokens but the layer has seen only {} (queries are the last appended "
          "positions: append first)",
          function, q.extent(1), store.tokens_seen);
    }
  }

  // The largest |x| the quantizer stores (f16: 65504), or float's largest finite value.
  static constexpr float storable_magnitude() noexcept {
    if constexpr (BoundsMagnitude<Quant>) {
      return Quant::max_magnitude();
    } else {
      return std::numeric_limits<float>::max();
    }
  }

  // Bits of the largest |x| of element type E that is ≤ storable_magnitude().
  template <class E>
  static auto magnitude_limit_bits() noexcept {
    using Bits = std::conditional_t<sizeof(E) == 4, std::uint32_t, std::uint16_t>;
    const float limit = storable_magnitude();
    E value = static_cast<E>(limit);
    Bits bits;
    std::memcpy(&bits, &value, sizeof(Bits));
    if (!(static_cast<float>(value) <= limit)) --bits;  // rounded up (or to inf): step down
    return bits;
  }

  // |x| is at most the limit: compared on the bit patterns with the sign cleared, which
  // also catches NaN and ±inf (their patterns are larger than any finite one). No early
  // exit, so it vectorizes; only a failing row is rescanned to name the bad element.
  template <class E, class Bits>
  static bool row_is_storable(const E* row, std::size_t n, Bits limit) noexcept {
    constexpr auto magnitude_mask = static_cast<Bits>(sizeof(Bits) == 4 ? 0x7fffffffU : 0x7fffU);
    unsigned bad = 0;
    for (std::size_t c = 0; c < n; ++c) {
      Bits bits;
      std::memcpy(&bits, row + c, sizeof(Bits));
      bad |= static_cast<unsigned>((bits & magnitude_mask) > limit);
    }
    return bad == 0;
  }

  // Queries need only be finite (no format bound): a NaN would poison every output row of
  // its group, and the integer kernels (simd/int8_dot.hpp) round queries, which a NaN or
  // inf has no answer for.
  template <class T>
  static void check_finite_queries(const View<T, 3>& q, const char* function = "attend") {
    using E = std::remove_const_t<T>;
    using Bits = std::conditional_t<sizeof(E) == 4, std::uint32_t, std::uint16_t>;
    const E largest = std::numeric_limits<E>::max();
    Bits limit;
    std::memcpy(&limit, &largest, sizeof(Bits));
    for (std::size_t h = 0; h < q.extent(0); ++h) {
      for (std::size_t t = 0; t < q.extent(1); ++t) {
        const E* row = q.pointer(h, t);
        if (row_is_storable(row, q.extent(2), limit)) continue;
        for (std::size_t c = 0; c < q.extent(2); ++c) {
          const float x = static_cast<float>(row[c]);
          if (!std::isfinite(x)) {
            detail::fail<ValueError>("{}: q[{}][{}][{}] is {}, queries must be finite", function, h,
                                     t, c, x);
          }
        }
      }
    }
  }

  template <class T>
  static void check_finite(const View<T, 3>& view, const char* function, const char* argument) {
    using E = std::remove_const_t<T>;
    const auto limit = magnitude_limit_bits<E>();
    for (std::size_t h = 0; h < view.extent(0); ++h) {
      for (std::size_t t = 0; t < view.extent(1); ++t) {
        const E* row = view.pointer(h, t);
        if (row_is_storable(row, view.extent(2), limit)) continue;
        for (std::size_t c = 0; c < view.extent(2); ++c) {
          const float x = static_cast<float>(row[c]);
          if (!std::isfinite(x)) {
            detail::fail<ValueError>("{}: {}[{}][{}][{}] is {}, kvc stores finite values only",
                                     function, argument, h, t, c, x);
          }
          if (std::abs(x) > storable_magnitude()) {
            detail::fail<ValueError>("{}: {}[{}][{}][{}] is {}, beyond the ±{} that '{}' stores",
                                     function, argument, h, t, c, x, storable_magnitude(),
                                     Quant::name());
          }
        }
      }
    }
  }

  std::size_t pages_for(std::size_t tokens) const noexcept {
    return (tokens + options_.page_tokens - 1) / options_.page_tokens;
  }

  Position position_at(const Head& head, std::size_t slot) const noexcept {
    Position position;
    std::memcpy(&position,
                pool_.data(head.pages[slot / options_.page_tokens]) + position_offset_ +
                    (slot % options_.page_tokens) * sizeof(Position),
                sizeof(Position));
    return position;
  }

  // ---- slot storage: codes in the pages, or (GroupsKeys) the fp32 tail ------------------

  // grouped: key codes decode with a key group's parameters (GroupsKeys, FitsKeys), and the
  // newest tokens wait in the head's fp32 tail. fitted: the group is the head's fitted basis.
  static constexpr bool fitted = FitsKeys<Quant>;
  static constexpr bool grouped = GroupsKeys<Quant> || fitted;
  // FitsKeys: whether a head fits at observe() (else at the end of an append).
  static constexpr bool fits_on_observe() noexcept {
    if constexpr (fitted) {
      return Quant::fits_on_observe;
    } else {
      return false;
    }
  }
  using GroupId = std::uint32_t;

  // Pages of `head` from the one holding `first_slot` on that another sequence shares: an
  // append writes into them, so each needs a private copy (reserved beforehand).
  std::size_t shared_pages_from(const Head& head, std::size_t first_slot) const noexcept {
    std::size_t shared = 0;
    for (std::size_t p = first_slot / options_.page_tokens; p < head.pages.size(); ++p) {
      shared += pool_.shared(head.pages[p]) ? 1 : 0;
    }
    return shared;
  }

  // The first stored slot an append may write: the end, or (GroupsKeys) the oldest slot
  // still waiting in fp32, whose codes it may now write.
  std::size_t first_written_slot(const Head& head) const noexcept {
    if constexpr (grouped) {
      return std::min({head.tokens, head.staging.keys_encoded, head.staging.values_encoded});
    } else {
      return head.tokens;
    }
  }

  // The page holding `slot`, copied first if another sequence shares it (reserved by the
  // caller, so this does not throw).
  std::byte* writable_page(Head& head, std::size_t slot) {
    PageId& page = head.pages[slot / options_.page_tokens];
    page = pool_.make_unique(page);
    return pool_.data(page);
  }

  GroupId group_at(const std::byte* page, std::size_t in_page) const noexcept {
    GroupId id = 0;
    std::memcpy(&id, page + group_offset_ + in_page * sizeof(GroupId), sizeof(GroupId));
    return id;
  }

  const std::byte* key_group(const Head& head, GroupId id) const noexcept {
    return head.staging.groups.data() + std::size_t{id} * key_group_bytes_;
  }

  // The value window's dead rows in front are dropped every this many steps (not every
  // step): KIVI's key group, a fitted format's window.
  static constexpr std::size_t value_front_drop() noexcept {
    if constexpr (GroupsKeys<Quant>) {
      return Quant::key_group_tokens;
    } else if constexpr (fitted) {
      return Quant::residual_tokens;
    } else {
      return 1;
    }
  }

  // Before an append of `count` tokens (grouped): room for the fp32 tail and, for
  // GroupsKeys, the key groups it may seal and one group's codes. The tail holds at most
  // residual_tokens keys (GroupsKeys, or FitsKeys once fitted; an unfitted head keeps every
  // key) and residual_tokens + value_front_drop() value rows.
  void reserve_staging(Head& head, std::size_t count) {
    constexpr std::size_t residual = Quant::residual_tokens;
    const std::size_t d = geometry_.head_dim;
    detail::KeyGroupStaging& staging = head.staging;
    staging.values.reserve((residual + value_front_drop()) * d);
    if constexpr (fitted) {
      // Grows geometrically: an unfitted head appended token by token keeps every key.
      const std::size_t keys = std::min(
          staging.keys.size() + count * d,
          staging.groups.empty() ? std::numeric_limits<std::size_t>::max() : (residual + 1) * d);
      if (keys > staging.keys.capacity()) {
        staging.keys.reserve(std::max(keys, 2 * staging.keys.capacity()));
      }
    } else {
      constexpr std::size_t group = Quant::key_group_tokens;
      staging.keys.reserve(residual * d);
      const std::size_t waiting = head.tokens - staging.keys_encoded;
      const std::size_t groups =
          staging.groups.size() + (waiting + count) / group * key_group_bytes_;
      if (groups > staging.groups.capacity()) {
        staging.groups.reserve(std::max(groups, 2 * staging.groups.capacity()));
      }
      group_codes_.resize(group * key_bytes_);
    }
  }

  // One appended token (its slot and position already exist) joins the fp32 tail
  // (grouped). GroupsKeys: when residual_tokens keys wait, they are sealed into key groups
  // (KIVI's decode step; a prefill chunk goes token by token, which seals the same groups
  // as KIVI's ⌊n / R⌋ · R at once). FitsKeys, once fitted: the key leaving the window is
  // encoded in the head's basis. Values beyond the newest residual_tokens leave the window.
  template <class E>
  void stage_token(Head& head, const E* key, const E* value) {
    constexpr std::size_t residual = Quant::residual_tokens;
    constexpr std::size_t drop = value_front_drop();
    const std::size_t d = geometry_.head_dim;
    const std::size_t page_tokens = options_.page_tokens;
    detail::KeyGroupStaging& staging = head.staging;
    staging.keys.resize(staging.keys.size() + d);  // within the reserved capacity
    simd::convert(key, staging.keys.data() + staging.keys.size() - d, d);
    staging.values.resize(staging.values.size() + d);
    simd::convert(value, staging.values.data() + staging.values.size() - d, d);

    if constexpr (fitted) {
      if (!staging.groups.empty() && staging.keys.size() > residual * d) seal_fitted(head, 1);
    } else if (staging.keys.size() == residual * d) {
      constexpr std::size_t group = Quant::key_group_tokens;
      for (std::size_t first = 0; first < residual; first += group) {
        const auto id = static_cast<GroupId>(staging.groups.size() / key_group_bytes_);
        staging.groups.resize(staging.groups.size() + key_group_bytes_);
        std::byte* params = staging.groups.data() + std::size_t{id} * key_group_bytes_;
        quantizer_.encode_key_group(staging.keys.data() + first * d, group, d, params,
                                    group_codes_.data());
        for (std::size_t j = 0; j < group; ++j) {
          const std::size_t slot = staging.keys_encoded + first + j;
          std::byte* page = writable_page(head, slot);
          const std::size_t in_page = slot % page_tokens;
          std::memcpy(page + in_page * key_bytes_, group_codes_.data() + j * key_bytes_,
                      key_bytes_);
          std::memcpy(page + group_offset_ + in_page * sizeof(GroupId), &id, sizeof(GroupId));
        }
      }
      staging.keys.clear();
      staging.keys_encoded += residual;
    }

    if (staging.values.size() / d - staging.values_front > residual) {
      const std::size_t slot = staging.values_encoded;
      std::byte* page = writable_page(head, slot);
      quantizer_.encode_value(staging.values.data() + staging.values_front * d, d,
                              page + value_offset_ + (slot % page_tokens) * value_bytes_);
      ++staging.values_encoded;
      if (++staging.values_front == drop) {
        staging.values.erase(staging.values.begin(),
                             staging.values.begin() + static_cast<std::ptrdiff_t>(drop * d));
        staging.values_front = 0;
      }
    }
  }

  // FitsKeys: the oldest `count` waiting keys encoded in the head's basis (its last key
  // group), in their slots (pages that another sequence shares were reserved by the caller).
  void seal_fitted(Head& head, std::size_t count) {
    const std::size_t d = geometry_.head_dim;
    detail::KeyGroupStaging& staging = head.staging;
    const auto id = static_cast<GroupId>(staging.groups.size() / key_group_bytes_ - 1);
    for (std::size_t j = 0; j < count; ++j) {
      const std::size_t slot = staging.keys_encoded + j;
      std::byte* page = writable_page(head, slot);
      const std::size_t in_page = slot % options_.page_tokens;
      quantizer_.encode_key(staging.keys.data() + j * d, d, key_group(head, id),
                            page + in_page * key_bytes_);
      std::memcpy(page + group_offset_ + in_page * sizeof(GroupId), &id, sizeof(GroupId));
    }
    staging.keys.erase(staging.keys.begin(),
                       staging.keys.begin() + static_cast<std::ptrdiff_t>(count * d));
    staging.keys_encoded += count;
  }

  // FitsKeys: a head without a basis and with more than residual_tokens keys waiting fits
  // one to all of them (and the window queries, if given), then encodes every waiting key
  // but the newest residual_tokens. The fit allocates before anything changes.
  void fit_head(Head& head, const float* queries, std::size_t rows) {
    constexpr std::size_t residual = Quant::residual_tokens;
    const std::size_t d = geometry_.head_dim;
    detail::KeyGroupStaging& staging = head.staging;
    const std::size_t waiting = staging.keys.size() / d;
    if (!staging.groups.empty() || waiting <= residual) return;
    std::vector<std::byte> basis(key_group_bytes_);
    quantizer_.fit_keys(KeyFit{staging.keys.data(), waiting, queries, rows, d}, basis.data());
    pool_.reserve(shared_pages_from(head, staging.keys_encoded));
    staging.groups = std::move(basis);
    seal_fitted(head, waiting - residual);
  }

  // FitsKeys: projected_ = the block's query rows in the head's basis (if it has one).
  void project_queries(const Head& head, std::size_t rows) {
    if (head.staging.groups.empty()) return;
    const std::size_t d = geometry_.head_dim;
    projected_.resize(rows * quantizer_.projected_dim(d));
    quantizer_.project_queries(queries_.data(), rows, d, key_group(head, 0), projected_.data());
  }

  // GroupsKeys, after compact() moved the kept_ slots: the fp32 tails keep the rows of the
  // kept slots, and key groups left without a token are dropped (ids renumbered: a slot's
  // id only changes when an earlier group vanished, so the slot moved and its page is
  // already private).
  void compact_staging(Head& head) {
    const std::size_t d = geometry_.head_dim;
    const std::size_t kept = kept_.size();
    detail::KeyGroupStaging& staging = head.staging;
    const auto first_waiting = [&](std::size_t encoded) {
      return static_cast<std::size_t>(std::lower_bound(kept_.begin(), kept_.end(), encoded) -
                                      kept_.begin());
    };
    // Rows move toward the front only (kept_ ascends), so a forward copy is safe.
    const auto keep_rows = [&](std::vector<float>& rows, std::size_t front, std::size_t encoded,
                               std::size_t new_encoded) {
      for (std::size_t i = new_encoded; i < kept; ++i) {
        const float* from = rows.data() + (front + kept_[i] - encoded) * d;
        std::copy(from, from + d, rows.data() + (i - new_encoded) * d);
      }
      rows.resize((kept - new_encoded) * d);
    };
    const std::size_t keys_encoded = first_waiting(staging.keys_encoded);
    keep_rows(staging.keys, 0, staging.keys_encoded, keys_encoded);
    staging.keys_encoded = keys_encoded;
    const std::size_t values_encoded = first_waiting(staging.values_encoded);
    keep_rows(staging.values, staging.values_front, staging.values_encoded, values_encoded);
    staging.values_encoded = values_encoded;
    staging.values_front = 0;

    GroupId last = std::numeric_limits<GroupId>::max();
    GroupId renamed = 0;
    std::size_t live = 0;
    for (std::size_t slot = 0; slot < keys_encoded; ++slot) {
      const std::size_t in_page = slot % options_.page_tokens;
      const GroupId id = group_at(pool_.data(head.pages[slot / options_.page_tokens]), in_page);
      if (id != last) {
        last = id;
        renamed = static_cast<GroupId>(live++);
        if (renamed != id) {
          std::memmove(staging.groups.data() + std::size_t{renamed} * key_group_bytes_,
                       staging.groups.data() + std::size_t{id} * key_group_bytes_,
                       key_group_bytes_);
        }
      }
      if (renamed != id) {
        std::byte* page = writable_page(head, slot);
        std::memcpy(page + group_offset_ + in_page * sizeof(GroupId), &renamed, sizeof(GroupId));
      }
    }
    staging.groups.resize(live * key_group_bytes_);
  }

  void decode_key_at(const Head& head, std::size_t slot, float* out) const {
    const std::size_t d = geometry_.head_dim;
    const std::byte* page = pool_.data(head.pages[slot / options_.page_tokens]);
    const std::size_t in_page = slot % options_.page_tokens;
    if constexpr (grouped) {
      const detail::KeyGroupStaging& staging = head.staging;
      if (slot >= staging.keys_encoded) {
        const float* row = staging.keys.data() + (slot - staging.keys_encoded) * d;
        std::copy(row, row + d, out);
      } else {
        quantizer_.decode_key(page + in_page * key_bytes_, d,
                              key_group(head, group_at(page, in_page)), out);
      }
    } else {
      quantizer_.decode_key(page + in_page * key_bytes_, d, out);
    }
  }

  void decode_value_at(const Head& head, std::size_t slot, float* out) const {
    const std::size_t d = geometry_.head_dim;
    const std::byte* page = pool_.data(head.pages[slot / options_.page_tokens]);
    const std::byte* codes = page + value_offset_ + (slot % options_.page_tokens) * value_bytes_;
    if constexpr (grouped) {
      const detail::KeyGroupStaging& staging = head.staging;
      if (slot >= staging.values_encoded) {
        const float* row =
            staging.values.data() + (staging.values_front + slot - staging.values_encoded) * d;
        std::copy(row, row + d, out);
        return;
      }
    }
    quantizer_.decode_value(codes, d, out);
  }

  // A rewritten row (merging) into its slot: re-encoded (a grouped key into its own group's
  // range), or written as is into the fp32 tail.
  void encode_key_at(Head& head, std::size_t slot, const float* row) {
    const std::size_t d = geometry_.head_dim;
    const std::size_t in_page = slot % options_.page_tokens;
    if constexpr (grouped) {
      detail::KeyGroupStaging& staging = head.staging;
      if (slot >= staging.keys_encoded) {
        std::copy(row, row + d, staging.keys.data() + (slot - staging.keys_encoded) * d);
      } else {
        std::byte* page = writable_page(head, slot);
        quantizer_.encode_key(row, d, key_group(head, group_at(page, in_page)),
                              page + in_page * key_bytes_);
      }
    } else {
      quantizer_.encode_key(row, d, writable_page(head, slot) + in_page * key_bytes_);
    }
  }

  void encode_value_at(Head& head, std::size_t slot, const float* row) {
    const std::size_t d = geometry_.head_dim;
    if constexpr (grouped) {
      detail::KeyGroupStaging& staging = head.staging;
      if (slot >= staging.values_encoded) {
        std::copy(
            row, row + d,
            staging.values.data() + (staging.values_front + slot - staging.values_encoded) * d);
        return;
      }
    }
    quantizer_.encode_value(
        row, d,
        writable_page(head, slot) + value_offset_ + (slot % options_.page_tokens) * value_bytes_);
  }

  // Scores of slots [slot, slot + tile.tokens) of page p into tile.scores (tile.key_codes is
  // set here): the quantizer's tile kernel, or (GroupsKeys) one tile per run of slots
  // sharing a key group and plain fp32 for the slots still waiting.
  void score_slots(const Head& head, std::size_t p, std::size_t slot, ScoreTile tile) const {
    const std::byte* page = pool_.data(head.pages[p]);
    tile.key_codes = page + slot * key_bytes_;
    if constexpr (grouped) {
      const std::size_t first = p * options_.page_tokens + slot;
      const std::size_t encoded = head.staging.keys_encoded;
      const std::size_t sealed =
          encoded > first ? std::min(tile.tokens, encoded - first) : std::size_t{0};
      for (std::size_t j = 0; j < sealed;) {
        const GroupId id = group_at(page, slot + j);
        std::size_t end = j + 1;
        while (end < sealed && group_at(page, slot + end) == id) ++end;
        ScoreTile run = tile;
        if constexpr (fitted) run.queries = projected_.data();
        run.key_codes = tile.key_codes + j * key_bytes_;
        run.tokens = end - j;
        run.scores = tile.scores + j;
        quantizer_.score_tile(run, key_group(head, id));
        j = end;
      }
      if (sealed < tile.tokens) {
        const std::size_t d = tile.head_dim;
        simd::dot_block(tile.queries, tile.rows, d,
                        head.staging.keys.data() + (first + sealed - encoded) * d,
                        tile.tokens - sealed, d, d, tile.scores + sealed, tile.scores_stride);
      }
    } else {
      quantizer_.score_tile(tile);
    }
  }

  // acc += weights · values of slots [slot, slot + tile.tokens) of page p (tile.value_codes
  // is set here); GroupsKeys: the slots in the fp32 window in plain fp32.
  void accumulate_slots(const Head& head, std::size_t p, std::size_t slot,
                        AccumulateTile tile) const {
    tile.value_codes = pool_.data(head.pages[p]) + value_offset_ + slot * value_bytes_;
    if constexpr (grouped) {
      const detail::KeyGroupStaging& staging = head.staging;
      const std::size_t first = p * options_.page_tokens + slot;
      const std::size_t encoded = staging.values_encoded;
      const std::size_t sealed =
          encoded > first ? std::min(tile.tokens, encoded - first) : std::size_t{0};
      if (sealed < tile.tokens) {
        const std::size_t d = tile.head_dim;
        simd::axpy_block(
            tile.weights + sealed, tile.rows, tile.weights_stride,
            staging.values.data() + (staging.values_front + first + sealed - encoded) * d,
            tile.tokens - sealed, d, d, tile.acc, d);
      }
      tile.tokens = sealed;
      if (sealed == 0) return;
    }
    quantizer_.accumulate_tile(tile);
  }

  // Per query token t of [first, first + count) of a chunk of `chunk` queries: how many
  // stored tokens it may see. Slots ascend by position, so it is a prefix; only the tail
  // appended with the chunk can lie in a query's future, so the walk is O(chunk).
  std::vector<std::size_t>& visible_counts(const Head& head, std::size_t tokens_seen,
                                           std::size_t first, std::size_t count,
                                           std::size_t chunk) {
    visible_.resize(count);
    std::size_t visible = head.tokens;
    for (std::size_t t = first + count; t-- > first;) {
      const auto query_position = static_cast<Position>(tokens_seen - chunk + t);
      while (visible > 0 && position_at(head, visible - 1) > query_position) --visible;
      visible_[t - first] = visible;
    }
    return visible_;
  }

  // queries_[r] for r = g * count + t: query head (kv_head * group + g), token first + t,
  // converted to fp32 and scaled by 1/sqrt(head_dim).
  template <class T>
  void load_queries(const View<T, 3>& q, std::size_t kv_head, std::size_t first,
                    std::size_t count) {
    const std::size_t d = geometry_.head_dim;
    const std::size_t group = geometry_.group_size();
    queries_.resize(group * count * d);
    const float scale = 1.0F / std::sqrt(static_cast<float>(d));
    for (std::size_t g = 0; g < group; ++g) {
      for (std::size_t t = 0; t < count; ++t) {
        float* row = queries_.data() + (g * count + t) * d;
        simd::convert(q.pointer(kv_head * group + g, first + t), row, d);
        simd::scale(scale, row, d);
      }
    }
    // GroupsKeys: the score tile also keeps its rows scaled by the key group (see
    // quant::Kivi::score_tile) and the group's parameters in fp32.
    tile_scratch_.resize((options_.page_tokens + (grouped ? group * count + 2 : 0)) * d);
  }

  template <class T>
  void widen_keys(const View<T, 3>& k, std::size_t kv_head, std::size_t count) {
    const std::size_t d = geometry_.head_dim;
    key_scratch_.resize(count * d);
    for (std::size_t t = 0; t < count; ++t) {
      simd::convert(k.pointer(kv_head, t), key_scratch_.data() + t * d, d);
    }
  }

  // One block of query tokens of one kv head: every page of the head is read once for all
  // group × count rows.
  template <class TQ, class TO>
  void attend_block(const Layer& store, const Head& head, std::size_t layer, std::size_t kv_head,
                    const View<TQ, 3>& q, const View<TO, 3>& out, std::size_t first,
                    std::size_t count) {
    const std::size_t d = geometry_.head_dim;
    const std::size_t group = geometry_.group_size();
    const std::size_t rows = group * count;
    const std::size_t page_tokens = options_.page_tokens;
    constexpr float minus_infinity = -std::numeric_limits<float>::infinity();

    load_queries(q, kv_head, first, count);
    const std::vector<std::size_t>& visible =
        visible_counts(head, store.tokens_seen, first, count, q.extent(1));
    const std::size_t reach = visible.back();  // the block's last query sees the most

    running_max_.assign(rows, minus_infinity);
    running_sum_.assign(rows, 0.0F);
    accumulator_.assign(rows * d, 0.0F);
    if constexpr (ConsumesAttention<Scorer>) weights_.assign(rows * head.tokens, minus_infinity);

    const std::size_t reachable_pages = pages_for(reach);
    pages_to_read_.clear();
    if constexpr (Index::reads_all) {
      for (std::size_t p = 0; p < reachable_pages; ++p) {
        pages_to_read_.push_back(static_cast<std::uint32_t>(p));
      }
    } else {
      index_.select_pages(
          std::as_const(head.index_state),
          SelectContext{layer, kv_head, queries_.data(), rows, d, reachable_pages, page_tokens},
          pages_to_read_);
      // The newest reachable page holds the queries' own tokens: always read it.
      const auto last = static_cast<std::uint32_t>(reachable_pages - 1);
      std::erase_if(pages_to_read_, [&](std::uint32_t p) { return p >= reachable_pages; });
      if (reachable_pages > 0 &&
          std::find(pages_to_read_.begin(), pages_to_read_.end(), last) == pages_to_read_.end()) {
        pages_to_read_.push_back(last);
      }
      std::sort(pages_to_read_.begin(), pages_to_read_.end());
      pages_to_read_.erase(std::unique(pages_to_read_.begin(), pages_to_read_.end()),
                           pages_to_read_.end());
    }

    if constexpr (PreparesQueries<Quant>) quantizer_.prepare_queries(queries_.data(), rows, d);
    if constexpr (fitted) project_queries(head, rows);
    // The integer score paths round each query row to int8: once here, not once per tile.
    const std::int8_t* query_codes = nullptr;
    if constexpr (requires { Quant::integer_scores(d); }) {
      if (Quant::integer_scores(d)) {
        query_codes_.resize(rows * d);
        query_scales_.resize(rows);
        simd::quantize_rows_s8(queries_.data(), rows, d, d, query_codes_.data(),
                               query_scales_.data());
        query_codes = query_codes_.data();
      }
    }

    // Pages are scored in runs of up to `run_tokens` tokens, then one online-softmax
    // update per row covers the whole run, then the run's values are accumulated: each page
    // is still read once, and the per-row softmax bookkeeping is amortized over many pages.
    const std::size_t run_tokens =
        std::max(page_tokens, std::size_t{256} / page_tokens * page_tokens);
    const std::size_t run_pages = run_tokens / page_tokens;
    const auto page_reach = [&](std::size_t i) {
      return std::min(page_tokens, reach - pages_to_read_[i] * page_tokens);
    };
    // What the loop below reads from the pool, in its order (a run's keys, then its values),
    // prefetched `prefetch_distance` bytes ahead: pumped as each slice of slots is consumed, so
    // DRAM streams during both the scoring and the accumulating pass.
    prefetch_.clear();
    for (std::size_t begin = 0; begin < pages_to_read_.size(); begin += run_pages) {
      const std::size_t end = std::min(pages_to_read_.size(), begin + run_pages);
      for (std::size_t i = begin; i < end; ++i) {
        const std::byte* page = pool_.data(head.pages[pages_to_read_[i]]);
        prefetch_.add(page, page_reach(i) * key_bytes_);
        if constexpr (grouped) prefetch_.add(page + group_offset_, page_reach(i) * sizeof(GroupId));
      }
      for (std::size_t i = begin; i < end; ++i) {
        prefetch_.add(pool_.data(head.pages[pages_to_read_[i]]) + value_offset_,
                      page_reach(i) * value_bytes_);
      }
    }
    // Tuned on Zen 5 at 16K context (docs/benchmarks.md): 16 KiB ahead; slices of about
    // 4 KiB of keys (16 slots of int8, a whole page of kivi2) and 8 KiB of values.
    // Smaller slices prefetch more smoothly but pay the tile kernels' per-call setup (the
    // integer paths' query and weight rounding) more often.
    constexpr std::size_t prefetch_distance = std::size_t{16} << 10;
    const auto slice_for = [&](std::size_t budget, std::size_t bytes) {
      return std::min(
          page_tokens,
          std::max(std::size_t{8}, std::bit_floor(budget / std::max(bytes, std::size_t{1}))));
    };
    // Tiles that cost the same per token at any size (UniformTileCost) take slices of half
    // that: 2 KiB of keys (8 slots of f16), 4 KiB of values.
    constexpr std::size_t slice_divisor = UniformTileCost<Quant> ? 2 : 1;
    const std::size_t key_slice = slice_for(4096 / slice_divisor, key_bytes_);
    const std::size_t value_slice = slice_for(8192 / slice_divisor, value_bytes_);
    const std::size_t key_stream_bytes = key_bytes_ + (grouped ? sizeof(GroupId) : 0);
    prefetch_.pump(prefetch_distance);

    scores_.resize(rows * run_tokens);
    for (std::size_t begin = 0; begin < pages_to_read_.size();) {
      const std::size_t end = std::min(pages_to_read_.size(), begin + run_pages);
      std::size_t width = 0;  // tokens in this run
      run_offsets_.clear();
      run_counts_.clear();
      for (std::size_t i = begin; i < end; ++i) {
        const std::size_t tokens = page_reach(i);
        for (std::size_t slot = 0; slot < tokens; slot += key_slice) {
          const std::size_t n = std::min(key_slice, tokens - slot);
          score_slots(head, pages_to_read_[i], slot,
                      ScoreTile{queries_.data(), rows, nullptr, n, d, scores_.data() + width + slot,
                                run_tokens, tile_scratch_.data(), false, query_codes,
                                query_codes != nullptr ? query_scales_.data() : nullptr});
          prefetch_.pump(n * key_stream_bytes);
        }
        run_offsets_.push_back(width);
        run_counts_.push_back(tokens);
        width += tokens;
      }
      for (std::size_t r = 0; r < rows; ++r) {
        float* row = scores_.data() + r * run_tokens;
        const std::size_t seen = visible[r % count];
        // Mask each page's part of the row beyond what this query may see (causal).
        for (std::size_t i = begin; i < end; ++i) {
          const std::size_t page_first = pages_to_read_[i] * page_tokens;
          const std::size_t offset = run_offsets_[i - begin];
          const std::size_t tokens = run_counts_[i - begin];
          const std::size_t live = seen > page_first ? std::min(tokens, seen - page_first) : 0;
          std::fill(row + offset + live, row + offset + tokens, minus_infinity);
          if constexpr (ConsumesAttention<Scorer>) {
            std::copy(row + offset, row + offset + tokens,
                      weights_.data() + r * head.tokens + page_first);
          }
        }
        // Online softmax: rescale what was accumulated when the running max grows.
        const float run_max = simd::max_value(row, width);
        const float new_max = std::max(running_max_[r], run_max);
        if (new_max == minus_infinity) {
          std::fill(row, row + width, 0.0F);
          continue;
        }
        const float correction = std::exp(running_max_[r] - new_max);
        const float run_sum = simd::exp_shift_sum(row, width, new_max);
        running_sum_[r] = running_sum_[r] * correction + run_sum;
        if (correction != 1.0F) simd::scale(correction, accumulator_.data() + r * d, d);
        running_max_[r] = new_max;
      }
      for (std::size_t i = begin; i < end; ++i) {
        const std::size_t offset = run_offsets_[i - begin];
        const std::size_t tokens = run_counts_[i - begin];
        for (std::size_t slot = 0; slot < tokens; slot += value_slice) {
          const std::size_t n = std::min(value_slice, tokens - slot);
          accumulate_slots(head, pages_to_read_[i], slot,
                           AccumulateTile{scores_.data() + offset + slot, rows, run_tokens, nullptr,
                                          n, d, accumulator_.data(), tile_scratch_.data()});
          prefetch_.pump(n * value_bytes_);
        }
      }
      begin = end;
    }

    if constexpr (FinishesOutputs<Quant>) quantizer_.finish_outputs(accumulator_.data(), rows, d);
    for (std::size_t r = 0; r < rows; ++r) {
      const std::size_t g = r / count;
      const std::size_t t = r % count;
      float* row = accumulator_.data() + r * d;
      // A query whose every visible token was evicted attends to nothing: output 0.
      const float inverse = running_sum_[r] > 0.0F ? 1.0F / running_sum_[r] : 0.0F;
      simd::scale(inverse, row, d);
      simd::convert(row, out.pointer(kv_head * group + g, first + t), d);
      if constexpr (ConsumesAttention<Scorer>) {
        const float* raw = weights_.data() + r * head.tokens;
        for (std::size_t i = 0; i < visible[t]; ++i) {
          head_weights_[i] += std::exp(raw[i] - running_max_[r]) * inverse;
        }
      }
    }
  }

  // ---- observation windows ------------------------------------------------------------

  // The softmax of the window queries (the last q_window.extent(1) positions before `end`)
  // over every stored key of each kv head, handed to the scorer and/or the planner that
  // observe queries.
  template <class T>
  void observe_window(Sequence& sequence, std::size_t layer, const View<T, 3>& q_window,
                      std::size_t end) {
    if constexpr (ObservesQueries<Scorer> || ObservesLayers<Planner>) {
      Layer& store = sequence.layers[layer];
      const std::size_t window = q_window.extent(1);
      const std::size_t group = geometry_.group_size();
      const std::size_t rows = group * window;
      for (std::size_t h = 0; h < geometry_.kv_heads; ++h) {
        Head& head = store.heads[h];
        const std::size_t n = head.tokens;
        load_queries(q_window, h, 0, window);
        if constexpr (PreparesQueries<Quant>) {
          quantizer_.prepare_queries(queries_.data(), rows, geometry_.head_dim);
        }
        if constexpr (fitted) project_queries(head, rows);
        weights_.assign(rows * n, -std::numeric_limits<float>::infinity());
        const auto visible = visible_counts(head, end, 0, window, window);
        for (std::size_t p = 0; p < head.pages.size(); ++p) {
          const std::size_t first = p * options_.page_tokens;
          const std::size_t tokens = std::min(options_.page_tokens, n - first);
          score_slots(head, p, 0,
                      ScoreTile{queries_.data(), rows, nullptr, tokens, geometry_.head_dim,
                                weights_.data() + first, n, tile_scratch_.data(), /*exact=*/true});
        }
        for (std::size_t r = 0; r < rows; ++r) {
          float* row = weights_.data() + r * n;
          const std::size_t seen = visible[r % window];
          std::fill(row + seen, row + n, -std::numeric_limits<float>::infinity());
          const float shift = simd::max_value(row, seen);
          const float total = simd::exp_shift_sum(row, n, shift);
          simd::scale(total > 0.0F ? 1.0F / total : 0.0F, row, n);
        }
        const ObserveEvent event{layer, h,      std::span<const float>(weights_.data(), rows * n),
                                 rows,  window, n};
        if constexpr (ObservesQueries<Scorer>) scorer_.on_observe(head.scorer_state, event);
        if constexpr (ObservesLayers<Planner>) planner_.on_observe(sequence.planner_state, event);
      }
    } else {
      (void)sequence;
      (void)layer;
      (void)q_window;
      (void)end;
    }
  }

  // CacheOptions::query_buffer: keeps the newest `query_buffer` query tokens of this attend
  // call in the layer's ring (the oldest leave it).
  template <class T>
  void buffer_queries(Layer& store, const View<T, 3>& q) {
    const std::size_t capacity = options_.query_buffer;
    const std::size_t d = geometry_.head_dim;
    const std::size_t count = q.extent(1);
    store.query_ring.resize(geometry_.q_heads * capacity * d);
    const std::size_t first = count > capacity ? count - capacity : 0;
    for (std::size_t t = first; t < count; ++t) {
      for (std::size_t head = 0; head < geometry_.q_heads; ++head) {
        simd::convert(q.pointer(head, t),
                      store.query_ring.data() + (head * capacity + store.ring_next) * d, d);
      }
      store.ring_next = (store.ring_next + 1) % capacity;
    }
    store.buffered_queries = std::min(capacity, store.buffered_queries + count - first);
  }

  // Before a compression: observes the buffered queries (oldest first), so query-aware
  // scorers re-score with the newest window during decode (kvpress DecodingPress).
  void observe_buffered(Sequence& sequence, std::size_t layer) {
    if constexpr (ObservesQueries<Scorer>) {
      Layer& store = sequence.layers[layer];
      const std::size_t window = store.buffered_queries;
      if (window == 0 || options_.query_buffer == 0) return;
      const std::size_t capacity = options_.query_buffer;
      const std::size_t d = geometry_.head_dim;
      buffered_window_.resize(geometry_.q_heads * window * d);
      const std::size_t oldest = (store.ring_next + capacity - window) % capacity;
      for (std::size_t head = 0; head < geometry_.q_heads; ++head) {
        for (std::size_t t = 0; t < window; ++t) {
          const float* row =
              store.query_ring.data() + (head * capacity + (oldest + t) % capacity) * d;
          std::copy(row, row + d, buffered_window_.data() + (head * window + t) * d);
        }
      }
      observe_window(sequence, layer,
                     View<const float, 3>(buffered_window_.data(), {geometry_.q_heads, window, d}),
                     store.tokens_seen);
    } else {
      (void)sequence;
      (void)layer;
    }
  }

  // ---- planning and compression ---------------------------------------------------------

  bool over_budget(const Sequence& sequence, std::size_t layer) {
    if constexpr (!Scorer::evicts) {
      (void)sequence;
      (void)layer;
      return false;
    } else {
      const Layer& store = sequence.layers[layer];
      plan(sequence, layer);
      for (std::size_t h = 0; h < geometry_.kv_heads; ++h) {
        if (store.heads[h].tokens > head_budgets_[h] + options_.eviction_slack) return true;
      }
      return false;
    }
  }

  void call_planner(const Sequence& sequence, const LayerPlan& layer_plan) {
    head_budgets_.assign(geometry_.kv_heads, 0);
    if constexpr (HasSequenceState<Planner>) {
      planner_.plan_layer(layer_plan, std::as_const(sequence.planner_state),
                          std::span<std::size_t>(head_budgets_));
    } else {
      (void)sequence;
      planner_.plan_layer(layer_plan, std::span<std::size_t>(head_budgets_));
    }
  }

  // The layer's plan request without scores; stored_ = tokens per kv head.
  LayerPlan layer_plan(const Sequence& sequence, std::size_t layer) {
    const Layer& store = sequence.layers[layer];
    stored_.resize(geometry_.kv_heads);
    for (std::size_t h = 0; h < geometry_.kv_heads; ++h) stored_[h] = store.heads[h].tokens;
    return LayerPlan{geometry_, layer, budget_of(sequence).resolve(store.tokens_seen),
                     store.tokens_seen, stored_};
  }

  // head_budgets_ = the plan without scores.
  void plan(const Sequence& sequence, std::size_t layer) {
    call_planner(sequence, layer_plan(sequence, layer));
  }

  void compress_layer(Sequence& sequence, std::size_t layer) {
    if constexpr (Scorer::evicts) {
      if constexpr (PlansSequence<Planner>) {
        if (planner_.wants_sequence_plan(std::as_const(sequence.planner_state),
                                         layer_plan(sequence, layer))) {
          compress_sequence(sequence);
          return;
        }
      }
      observe_buffered(sequence, layer);
      compress_one_layer(sequence, layer);
      cascade(sequence, layer);
    } else {
      (void)sequence;
      (void)layer;
    }
  }

  // A Cascades planner: layer `layer` may have re-split the budget (CAKE: its observe added
  // a preference), so earlier layers over their new share shrink to it now — also when
  // `layer` itself keeps every token and was not compressed.
  void cascade(Sequence& sequence, std::size_t layer) {
    if constexpr (Scorer::evicts && Cascades<Planner>) {
      for (std::size_t earlier = 0; earlier < layer; ++earlier) {
        if (over_budget(sequence, earlier)) compress_one_layer(sequence, earlier);
      }
    } else {
      (void)sequence;
      (void)layer;
    }
  }

  void compress_one_layer(Sequence& sequence, std::size_t layer) {
    Layer& store = sequence.layers[layer];
    plan(sequence, layer);
    if constexpr (PlansFromScores<Planner>) {
      // A planner that splits by score (AdaKV): scored path, instantiated only for it.
      if (planner_.wants_scores()) {
        compress_layer_from_scores(sequence, layer);
        return;
      }
    }
    for (std::size_t h = 0; h < geometry_.kv_heads; ++h) {
      Head& head = store.heads[h];
      const std::size_t budget = head_budgets_[h];
      if (head.tokens <= budget) continue;
      select_survivors(head, layer, h, budget, store.tokens_seen);
      evict_to_kept(head, layer, h);
    }
  }

  // For a planner with wants_scores() (AdaKV): when the plan without scores finds a head
  // over budget, score every head of the layer (ScoreContext::budget = the base budget,
  // capped at the head's tokens: the planned budget is not known before scoring), plan
  // again with LayerPlan::scores, then keep each head's `budget` best of those scores.
  void compress_layer_from_scores(Sequence& sequence, std::size_t layer) {
    Layer& store = sequence.layers[layer];
    const std::size_t heads = geometry_.kv_heads;
    bool over = false;
    for (std::size_t h = 0; h < heads; ++h) over = over || store.heads[h].tokens > head_budgets_[h];
    if (!over) return;
    const std::size_t base_budget = budget_of(sequence).resolve(store.tokens_seen);
    if (layer_scores_.size() < heads) layer_scores_.resize(heads);
    score_views_.resize(heads);
    for (std::size_t h = 0; h < heads; ++h) {
      const Head& head = store.heads[h];
      score_head(head, layer, h, std::min(base_budget, head.tokens), store.tokens_seen,
                 layer_scores_[h]);
      score_views_[h] = std::span<const float>(layer_scores_[h].data(), head.tokens);
    }
    call_planner(sequence, LayerPlan{geometry_, layer, base_budget, store.tokens_seen, stored_,
                                     score_views_});
    evict_by_scores(store, layer, score_views_);
  }

  // A planner with PlansSequence (PrefixKV): score every kv head of every layer, let the
  // planner split the budget across layers from all of them, then keep each head's best.
  void compress_sequence(Sequence& sequence) {
    if constexpr (PlansSequence<Planner>) {
      const std::size_t layers = geometry_.layers;
      const std::size_t heads = geometry_.kv_heads;
      for (std::size_t layer = 0; layer < layers; ++layer) observe_buffered(sequence, layer);
      if (sequence_scores_.size() < layers * heads) sequence_scores_.resize(layers * heads);
      sequence_views_.resize(layers * heads);
      sequence_stored_.resize(layers * heads);
      layer_plans_.clear();
      for (std::size_t layer = 0; layer < layers; ++layer) {
        const Layer& store = sequence.layers[layer];
        const std::size_t base_budget = budget_of(sequence).resolve(store.tokens_seen);
        for (std::size_t h = 0; h < heads; ++h) {
          const Head& head = store.heads[h];
          const std::size_t i = layer * heads + h;
          score_head(head, layer, h, std::min(base_budget, head.tokens), store.tokens_seen,
                     sequence_scores_[i]);
          sequence_views_[i] = std::span<const float>(sequence_scores_[i].data(), head.tokens);
          sequence_stored_[i] = head.tokens;
        }
        layer_plans_.push_back(
            LayerPlan{geometry_, layer, base_budget, store.tokens_seen,
                      std::span<const std::size_t>(sequence_stored_.data() + layer * heads, heads),
                      std::span<const std::span<const float>>(
                          sequence_views_.data() + layer * heads, heads)});
      }
      planner_.plan_sequence(sequence.planner_state, SequencePlan{geometry_, layer_plans_});
      for (std::size_t layer = 0; layer < layers; ++layer) {
        call_planner(sequence, layer_plans_[layer]);
        evict_by_scores(
            sequence.layers[layer], layer,
            std::span<const std::span<const float>>(sequence_views_.data() + layer * heads, heads));
      }
    } else {
      (void)sequence;
    }
  }

  // Every head of the layer over its planned budget (head_budgets_) keeps its `budget` best
  // by the scores already computed for it (the scored paths: AdaKV, PrefixKV).
  void evict_by_scores(Layer& store, std::size_t layer,
                       std::span<const std::span<const float>> scores) {
    for (std::size_t h = 0; h < geometry_.kv_heads; ++h) {
      Head& head = store.heads[h];
      const std::size_t budget = head_budgets_[h];
      if (head.tokens <= budget) continue;
      load_positions(head);
      keep_best(scores[h], budget);
      evict_to_kept(head, layer, h);
    }
  }

  // Compacts `head` to the kept_ slots (merging the evicted ones into them first, for a
  // scorer that merges) and tells the policies which survived. positions_ holds the head's
  // positions.
  void evict_to_kept(Head& head, std::size_t layer, std::size_t kv_head) {
    if constexpr (MergesEvicted<Scorer>) merge_evicted(head, layer, kv_head);
    compact(head);
    scorer_.on_compact(head.scorer_state, kept_);
    if constexpr (!Index::reads_all) index_.on_compact(head.index_state, kept_);
  }

  // MergesEvicted: hands the head's K/V in fp32 to the scorer and re-encodes the kept rows
  // it rewrote, in place (shared pages are copied first).
  void merge_evicted(Head& head, std::size_t layer, std::size_t kv_head) {
    // An index that summarizes keys (page bounds) is told about compaction only, not about
    // rewritten rows: it would select pages by stale keys.
    static_assert(Index::reads_all,
                  "KvCache: a scorer that merges (MergesEvicted) needs an index that reads every "
                  "page (reads_all): the index is not told about merged keys");
    const std::size_t n = head.tokens;
    const std::size_t d = geometry_.head_dim;
    const std::size_t page_tokens = options_.page_tokens;
    merge_keys_.resize(n * d);
    merge_values_.resize(n * d);
    for (std::size_t slot = 0; slot < n; ++slot) {
      decode_key_at(head, slot, merge_keys_.data() + slot * d);
      decode_value_at(head, slot, merge_values_.data() + slot * d);
    }
    // Reserve before the scorer changes its state: every shared page holding a kept slot
    // may need a copy (an upper bound), so nothing can throw after merge().
    std::size_t shared_pages = 0;
    for (std::size_t i = 0; i < kept_.size();) {
      const std::size_t p = kept_[i] / page_tokens;
      shared_pages += pool_.shared(head.pages[p]) ? 1 : 0;
      while (i < kept_.size() && kept_[i] / page_tokens == p) ++i;
    }
    pool_.reserve(shared_pages);
    changed_.assign(n, 0);
    scorer_.merge(head.scorer_state, MergeEvent{layer, kv_head, merge_keys_, merge_values_, kept_,
                                                positions_, d, changed_});
    for (const std::uint32_t slot : kept_) {
      if (changed_[slot] == 0) continue;
      encode_key_at(head, slot, merge_keys_.data() + slot * d);
      encode_value_at(head, slot, merge_values_.data() + slot * d);
    }
  }

  // kept_ = the `budget` slots with the highest scores (ties: the newer token), ascending.
  void select_survivors(const Head& head, std::size_t layer, std::size_t kv_head,
                        std::size_t budget, std::size_t tokens_seen) {
    score_head(head, layer, kv_head, budget, tokens_seen, token_scores_);
    keep_best(token_scores_, budget);
  }

  void load_positions(const Head& head) {
    positions_.resize(head.tokens);
    for (std::size_t slot = 0; slot < head.tokens; ++slot) {
      positions_[slot] = position_at(head, slot);
    }
  }

  // scores = the scorer's score of each stored slot of `head` (NaN → −inf); positions_ = the
  // head's positions.
  void score_head(const Head& head, std::size_t layer, std::size_t kv_head, std::size_t budget,
                  std::size_t tokens_seen, std::vector<float>& scores) {
    const std::size_t n = head.tokens;
    load_positions(head);
    scores.assign(n, 0.0F);
    ScoreContext context{layer, kv_head, positions_, budget, tokens_seen, {}, geometry_.head_dim};
    if constexpr (ScoresStoredKeys<Scorer>) {
      const std::size_t d = geometry_.head_dim;
      key_scratch_.resize(n * d);
      for (std::size_t slot = 0; slot < n; ++slot) {
        decode_key_at(head, slot, key_scratch_.data() + slot * d);
      }
      context.keys = std::span<const float>(key_scratch_.data(), n * d);
    }
    scorer_.score(head.scorer_state, context, std::span<float>(scores.data(), n));
    for (float& score : scores) {
      if (std::isnan(score)) score = -std::numeric_limits<float>::infinity();
    }
  }

  // kept_ = the `budget` slots with the highest `scores`, ascending; ties go to the newer
  // token (positions_ must hold the head's positions).
  void keep_best(std::span<const float> scores, std::size_t budget) {
    const std::size_t n = scores.size();
    kept_.resize(n);
    for (std::size_t slot = 0; slot < n; ++slot) kept_[slot] = static_cast<std::uint32_t>(slot);
    const auto better = [&](std::uint32_t a, std::uint32_t b) {
      if (scores[a] != scores[b]) return scores[a] > scores[b];
      return positions_[a] > positions_[b];
    };
    std::nth_element(kept_.begin(), kept_.begin() + static_cast<std::ptrdiff_t>(budget),
                     kept_.end(), better);
    kept_.resize(budget);
    std::sort(kept_.begin(), kept_.end());
  }

  // Moves the kept_ slots to the front (stable), copying shared pages before writing them,
  // and returns the pages past the new end to the pool.
  void compact(Head& head) {
    const std::size_t page_tokens = options_.page_tokens;
    const std::size_t kept = kept_.size();
    std::size_t first_moved = 0;
    while (first_moved < kept && kept_[first_moved] == first_moved) ++first_moved;
    const std::size_t kept_pages = pages_for(kept);
    std::size_t shared_pages = 0;
    for (std::size_t p = first_moved / page_tokens; p < kept_pages; ++p) {
      shared_pages += pool_.shared(head.pages[p]) ? 1 : 0;
    }
    pool_.reserve(shared_pages);
    for (std::size_t p = first_moved / page_tokens; p < kept_pages; ++p) {
      head.pages[p] = pool_.make_unique(head.pages[p]);
    }
    for (std::size_t slot = first_moved; slot < kept; ++slot) {
      const std::size_t source = kept_[slot];
      std::byte* to = pool_.data(head.pages[slot / page_tokens]);
      const std::byte* from = pool_.data(head.pages[source / page_tokens]);
      const std::size_t to_slot = slot % page_tokens;
      const std::size_t from_slot = source % page_tokens;
      std::memmove(to + to_slot * key_bytes_, from + from_slot * key_bytes_, key_bytes_);
      std::memmove(to + value_offset_ + to_slot * value_bytes_,
                   from + value_offset_ + from_slot * value_bytes_, value_bytes_);
      std::memmove(to + position_offset_ + to_slot * sizeof(Position),
                   from + position_offset_ + from_slot * sizeof(Position), sizeof(Position));
      if constexpr (grouped) {
        std::memmove(to + group_offset_ + to_slot * sizeof(GroupId),
                     from + group_offset_ + from_slot * sizeof(GroupId), sizeof(GroupId));
      }
    }
    for (std::size_t p = kept_pages; p < head.pages.size(); ++p) pool_.release(head.pages[p]);
    head.pages.resize(kept_pages);
    head.tokens = kept;
    if constexpr (grouped) compact_staging(head);
  }

  CacheStats empty_stats() const {
    CacheStats result;
    result.scorer = Scorer::name();
    result.quantizer = Quant::name();
    result.layers = geometry_.layers;
    result.kv_heads = geometry_.kv_heads;
    result.head_dim = geometry_.head_dim;
    result.tokens_per_head.assign(geometry_.layers * geometry_.kv_heads, 0);
    result.page_size_bytes = pool_.page_bytes();
    result.pool_reserved_bytes = pool_.bytes_reserved();
    return result;
  }

  void add_sequence(CacheStats& result, const Sequence& sequence) const {
    ++result.sequences;
    result.metadata_bytes += sizeof(SequenceCore) + planner_state_bytes(sequence) +
                             sequence.layers.capacity() * sizeof(Layer);
    for (std::size_t l = 0; l < sequence.layers.size(); ++l) {
      const Layer& layer = sequence.layers[l];
      result.tokens_seen += layer.tokens_seen;
      result.metadata_bytes +=
          layer.heads.capacity() * sizeof(Head) + layer.query_ring.capacity() * sizeof(float);
      for (std::size_t h = 0; h < layer.heads.size(); ++h) {
        const Head& head = layer.heads[h];
        result.tokens_per_head[l * geometry_.kv_heads + h] += head.tokens;
        result.tokens_stored += head.tokens;
        if constexpr (grouped) {
          const detail::KeyGroupStaging& staging = head.staging;
          const std::size_t row_bytes = geometry_.head_dim * sizeof(float);
          result.code_bytes +=
              staging.keys_encoded * key_bytes_ + staging.values_encoded * value_bytes_ +
              staging.groups.size() +
              (2 * head.tokens - staging.keys_encoded - staging.values_encoded) * row_bytes;
          result.staged_bytes +=
              (staging.keys.capacity() + staging.values.capacity()) * sizeof(float) +
              staging.groups.capacity();
        } else {
          result.code_bytes += head.tokens * (key_bytes_ + value_bytes_);
        }
        result.metadata_bytes += head.pages.capacity() * sizeof(PageId);
        if constexpr (ReportsStateBytes<Scorer>) {
          result.metadata_bytes += scorer_.state_bytes(head.scorer_state);
        }
        if constexpr (ReportsStateBytes<Index>) {
          result.metadata_bytes += index_.state_bytes(head.index_state);
        }
      }
    }
  }

  Geometry geometry_;
  CacheOptions options_;
  [[no_unique_address]] Scorer scorer_;
  [[no_unique_address]] Quant quantizer_;
  [[no_unique_address]] Index index_;
  [[no_unique_address]] Offload offload_;
  [[no_unique_address]] Planner planner_;
  std::size_t key_bytes_;
  std::size_t value_bytes_;
  std::size_t value_offset_;
  std::size_t position_offset_;
  std::size_t group_offset_;
  std::size_t key_group_bytes_ = 0;  // GroupsKeys: one key group's parameters
  PagePool<Backend> pool_;
  std::vector<Sequence> sequences_;
  std::vector<std::uint32_t> free_slots_;

  // Scratch reused across calls so the hot path does not allocate once warmed up.
  std::vector<float> queries_, scores_, accumulator_, running_max_, running_sum_, tile_scratch_;
  simd::PrefetchStream prefetch_;         // attend_block's reads, in order (see there)
  std::vector<std::int8_t> query_codes_;  // queries_ rounded to int8 (integer score paths)
  std::vector<float> query_scales_;
  std::vector<float> weights_, head_weights_, key_scratch_, token_scores_;
  std::vector<std::size_t> visible_, head_budgets_, stored_, run_offsets_, run_counts_;
  std::vector<std::uint32_t> pages_to_read_, kept_;
  std::vector<Position> positions_;
  std::vector<std::vector<float>> layer_scores_;     // per kv head, planners with scores
  std::vector<std::span<const float>> score_views_;  // LayerPlan::scores
  // compress_sequence (PlansSequence): per (layer, kv head) scores, and the layers' plans.
  std::vector<std::vector<float>> sequence_scores_;
  std::vector<std::span<const float>> sequence_views_;
  std::vector<std::size_t> sequence_stored_;
  std::vector<LayerPlan> layer_plans_;
  std::vector<float> buffered_window_, merge_keys_, merge_values_;  // query_buffer, merging
  std::vector<std::uint8_t> changed_;
  std::vector<std::byte> group_codes_;  // GroupsKeys: one key group's codes being encoded
  std::vector<float> projected_;        // FitsKeys: the block's query rows in the basis
};

}  // namespace kvc

template <>
struct fmt::formatter<kvc::SequenceId> : fmt::formatter<std::uint32_t> {
  template <class FormatContext>
  auto format(const kvc::SequenceId& id, FormatContext& context) const {
    return fmt::format_to(context.out(), "seq{}.{}", id.slot, id.generation);
  }
};
