// kvc/core/concepts.hpp — the six policy roles of KvCache, as C++20 concepts.
//
// Each role is the conjunction of small named concepts, so that a custom policy missing
// a piece gets a compiler error naming that piece ("constraints not satisfied:
// kvc::ScoresTokens<MyScorer>") rather than a wall of template noise. docs/concepts.md
// explains each requirement; tests/core/concepts.cpp checks an archetype of every role.
//
// A policy is a small value type with the members below — no base class, no virtuals.
#pragma once

#include <kvc/core/element.hpp>
#include <kvc/core/events.hpp>

#include <concepts>
#include <cstddef>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

namespace kvc {

// ---------------------------------------------------------------------------------------
// Shared pieces.

// Every policy names itself (stats, errors and recipes print it).
template <class P>
concept NamedPolicy = requires {
  { P::name() } -> std::convertible_to<std::string_view>;
};

// Per (sequence, layer, kv head) state the cache stores for the policy and copies on fork.
template <class P>
concept HasHeadState =
    std::default_initializable<typename P::HeadState> && std::copyable<typename P::HeadState>;

// Optional: report the heap bytes a HeadState holds, so stats() can count them.
template <class P>
concept ReportsStateBytes = requires(const P& policy, const typename P::HeadState& state) {
  { policy.state_bytes(state) } -> std::convertible_to<std::size_t>;
};

// ---------------------------------------------------------------------------------------
// Eviction scorer: which tokens survive.

template <class S>
concept DeclaresEviction = requires {
  { S::evicts } -> std::convertible_to<bool>;
};

template <class S>
concept TracksAppends = requires(S& scorer, typename S::HeadState& state, const AppendEvent& e) {
  scorer.on_append(state, e);
};

// Writes one score per stored token; the cache keeps the `budget` highest
// (ties: the newer token). +inf marks a token that must stay.
template <class S>
concept ScoresTokens = requires(S& scorer, const typename S::HeadState& state,
                                const ScoreContext& context, std::span<float> scores) {
  scorer.score(state, context, scores);
};

// After eviction, `kept` lists the surviving slots (ascending, old storage order).
template <class S>
concept CompactsState = requires(S& scorer, typename S::HeadState& state,
                                 std::span<const std::uint32_t> kept) {
  scorer.on_compact(state, kept);
};

// Optional: the scorer wants the attention weights attend() computes (H2O, TOVA, ...).
template <class S>
concept ConsumesAttention = requires(S& scorer, typename S::HeadState& state,
                                     const AttentionEvent& event) {
  scorer.on_attention(state, event);
};

// Optional: the scorer wants window-query attention from observe() (SnapKV, ...).
template <class S>
concept ObservesQueries = requires(S& scorer, typename S::HeadState& state,
                                   const ObserveEvent& event) {
  scorer.on_observe(state, event);
};

// Optional flags: `static constexpr bool wants_appended_keys = true;` fills
// AppendEvent::keys; `static constexpr bool scores_stored_keys = true;` fills
// ScoreContext::keys. Both cost an fp32 widening of the keys concerned, so they are off
// unless the scorer asks.
template <class S>
concept WantsAppendedKeys = requires {
  requires static_cast<bool>(S::wants_appended_keys);
};

template <class S>
concept ScoresStoredKeys = requires {
  requires static_cast<bool>(S::scores_stored_keys);
};

// Optional: merge evicted tokens into the survivors instead of dropping them (D2O, CAM).
// Runs after the kept set is chosen and before the head is compacted.
template <class S>
concept MergesEvicted = requires(S& scorer, typename S::HeadState& state, const MergeEvent& event) {
  scorer.merge(state, event);
};

template <class S>
concept EvictionScorer = NamedPolicy<S> && HasHeadState<S> && DeclaresEviction<S> &&
    TracksAppends<S> && ScoresTokens<S> && CompactsState<S>;

// ---------------------------------------------------------------------------------------
// Budget planner: how a budget splits across the heads of a layer (and across layers).

template <class P>
concept PlansLayers = requires(P& planner, const LayerPlan& plan, std::span<std::size_t> out) {
  planner.plan_layer(plan, out);
};

// Optional: the planner splits a layer by the scorer's scores (AdaKV). It has
// `wants_scores()` → bool: `static constexpr bool wants_scores() { return true; }` for a
// planner that always wants them, a run-time answer for one that dispatches (the recipes'
// RecipePlanner). When it answers true, compressing a layer scores every kv head first,
// fills LayerPlan::scores and plans once more with them; the over-budget check still calls
// plan_layer with empty scores, so it must answer cheaply without them.
template <class P>
concept PlansFromScores = requires(const P& planner) {
  { planner.wants_scores() } -> std::convertible_to<bool>;
};

// Optional: per-sequence planner state that the cache stores with each sequence (copied on
// fork) and hands to every call — CAKE's layer preferences, PrefixKV's layer budgets.
// Such a planner plans with plan_layer(plan, state, out).
template <class P>
concept HasSequenceState = requires {
  typename P::SequenceState;
}
&&std::default_initializable<typename P::SequenceState>&& std::copyable<typename P::SequenceState>;

// Optional: the bytes a SequenceState holds, itself included (stats() counts them; without
// it, sizeof(SequenceState)).
template <class P>
concept ReportsSequenceStateBytes = HasSequenceState<P> &&
    requires(const P& planner, const typename P::SequenceState& state) {
  { planner.state_bytes(state) } -> std::convertible_to<std::size_t>;
};

template <class P>
concept PlansLayersWithState = HasSequenceState<P> &&
    requires(P& planner, const LayerPlan& plan, const typename P::SequenceState& state,
             std::span<std::size_t> out) {
  planner.plan_layer(plan, state, out);
};

// Optional (with a SequenceState): the planner sees the window attention observe() computes
// for every kv head (CAKE measures each layer's dispersion and shift there).
template <class P>
concept ObservesLayers = HasSequenceState<P> &&
    requires(P& planner, typename P::SequenceState& state, const ObserveEvent& event) {
  planner.on_observe(state, event);
};

// Optional (with a SequenceState): the planner splits the budget across layers from every
// layer's scores at once (PrefixKV). When wants_sequence_plan(state, plan) answers true
// for the layer being compressed, the cache scores every kv head of every layer, calls
// plan_sequence (which records its split in the state), then compresses every layer with
// plan_layer(plan-with-scores, state, out).
template <class P>
concept PlansSequence = HasSequenceState<P> &&
    requires(P& planner, typename P::SequenceState& state, const SequencePlan& plan,
             const LayerPlan& layer_plan) {
  {
    std::as_const(planner).wants_sequence_plan(std::as_const(state), layer_plan)
    } -> std::convertible_to<bool>;
  planner.plan_sequence(state, plan);
};

// Optional flag `static constexpr bool cascades = true;`: after compressing a layer, the
// cache also compresses every earlier layer of the sequence that the new plan puts over
// budget (CAKE's cascading prefill: each new layer re-splits the budget among the layers
// seen so far and the earlier ones shrink to their new share at once).
template <class P>
concept Cascades = requires {
  requires static_cast<bool>(P::cascades);
};

template <class P>
concept BudgetPlanner = NamedPolicy<P> &&(PlansLayers<P> || PlansLayersWithState<P>);

// ---------------------------------------------------------------------------------------
// Quantizer: how kept tokens are encoded, and the fused kernels over that encoding.

template <class Q>
concept SizesTokens = requires(const Q& quantizer, std::size_t head_dim) {
  { quantizer.key_bytes(head_dim) } -> std::same_as<std::size_t>;
  { quantizer.value_bytes(head_dim) } -> std::same_as<std::size_t>;
  { quantizer.supports_head_dim(head_dim) } -> std::convertible_to<bool>;
};

template <class Q, class T>
concept EncodesFrom = requires(const Q& quantizer, const T* source, std::size_t head_dim,
                               std::byte* destination) {
  quantizer.encode_key(source, head_dim, destination);
  quantizer.encode_value(source, head_dim, destination);
};

// Accepts every host element type (float, Eigen::half, Eigen::bfloat16).
template <class Q>
concept EncodesTokens =
    EncodesFrom<Q, float> && EncodesFrom<Q, Eigen::half> && EncodesFrom<Q, Eigen::bfloat16>;

template <class Q>
concept DecodesTokens = requires(const Q& quantizer, const std::byte* codes, std::size_t head_dim,
                                 float* destination) {
  quantizer.decode_key(codes, head_dim, destination);
  quantizer.decode_value(codes, head_dim, destination);
};

// attend() runs on the encoded pages through these; it never decodes the cache whole.
template <class Q>
concept FusedAttendKernels = requires(const Q& quantizer, const ScoreTile& score_tile,
                                      const AccumulateTile& accumulate_tile) {
  quantizer.score_tile(score_tile);
  quantizer.accumulate_tile(accumulate_tile);
};

// Optional: the largest |x| the format can store; KvCache rejects larger inputs.
template <class Q>
concept BoundsMagnitude = requires {
  { Q::max_magnitude() } -> std::convertible_to<float>;
};

// Optional: a transform of the query rows the format needs before any score tile (a
// rotation, a channel permutation). It runs once per attend block (rows = GQA group ×
// query tokens, already scaled by 1/sqrt(d)) and once per observe call, after the retrieval
// index picked its pages, so its cost is per query row, never per stored token.
template <class Q>
concept PreparesQueries = requires(const Q& quantizer, float* queries, std::size_t rows,
                                   std::size_t head_dim) {
  quantizer.prepare_queries(queries, rows, head_dim);
};

// Optional: the inverse transform on the attention output rows (Σ_j p_j·value(j) in the
// format's space), once per attend block before the rows are written out.
template <class Q>
concept FinishesOutputs = requires(const Q& quantizer, float* outputs, std::size_t rows,
                                   std::size_t head_dim) {
  quantizer.finish_outputs(outputs, rows, head_dim);
};

// Optional: `static constexpr bool uniform_tile_cost = true;` declares that a tile costs the
// same per token at any size: its kernels work on the codes as they stream by (widened in
// registers, simd::dot_block / axpy_block) and round or gather nothing per call. attend then
// hands it finer slices of each page, so its prefetches interleave with the arithmetic more
// evenly (at 16K, GQA 4, Dense<half> 225 -> 173 ns per token: docs/benchmarks.md). Tiles
// with a setup per call (the integer paths round the query rows and weights per tile) keep
// the coarser default, where that setup is amortized.
template <class Q>
concept UniformTileCost = requires {
  requires Q::uniform_tile_cost;
};

// A quantizer of token rows: every key and value row is encoded on its own.
template <class Q>
concept QuantizesTokens = EncodesTokens<Q> && DecodesTokens<Q> && FusedAttendKernels<Q>;

// The other shape (KIVI): keys are quantized per channel over groups of
// Q::key_group_tokens consecutive stored tokens, so a key row decodes only with its group's
// parameters (key_group_bytes), and the newest tokens wait in full precision: KvCache keeps
// each kv head's keys in fp32 until Q::residual_tokens of them wait, then encodes them
// group by group, and keeps the newest residual_tokens values in fp32 (a sliding window).
// Values are per-token rows as above. Score tiles never span two key groups.
template <class Q>
concept GroupsKeys = requires(const Q& quantizer, const float* rows, std::size_t count,
                              std::size_t head_dim, std::byte* params, std::byte* codes,
                              const std::byte* group, const std::byte* stored, float* out,
                              const ScoreTile& score_tile, const AccumulateTile& accumulate_tile) {
  { Q::key_group_tokens } -> std::convertible_to<std::size_t>;
  { Q::residual_tokens } -> std::convertible_to<std::size_t>;
  requires Q::key_group_tokens >
  0 && Q::residual_tokens >= Q::key_group_tokens&& Q::residual_tokens % Q::key_group_tokens == 0;
  { quantizer.key_group_bytes(head_dim) } -> std::same_as<std::size_t>;
  quantizer.encode_key_group(rows, count, head_dim, params, codes);
  quantizer.encode_key(rows, head_dim, group, codes);
  quantizer.decode_key(stored, head_dim, group, out);
  quantizer.score_tile(score_tile, group);
  quantizer.encode_value(rows, head_dim, codes);
  quantizer.decode_value(stored, head_dim, out);
  quantizer.accumulate_tile(accumulate_tile);
};

// The third shape (ThinK, low-rank keys): each kv head's keys are stored as
// projected_dim(d) numbers in a basis fitted to that head's own keys — its one key group,
// key_group_bytes of parameters (kept channels, a rank-r basis). Until the fit, a head's keys
// wait in fp32; the cache fits a head at the end of an append that leaves more than
// Q::residual_tokens keys waiting, or, with Q::fits_on_observe, at observe() (KeyFit gets
// the window's queries). From then on the newest residual_tokens keys stay in fp32 (an
// exact window) and each older key is encoded in the basis as it leaves the window.
// project_queries maps query rows into the basis once per attend block; score_tile then
// gets those rows (projected_dim(d) floats each). Values are per-token rows, with the same
// fp32 window.
template <class Q>
concept FitsKeys = requires(const Q& quantizer, const KeyFit& fit, const float* rows,
                            std::size_t count, std::size_t head_dim, std::byte* params,
                            std::byte* codes, const std::byte* group, const std::byte* stored,
                            float* out, const ScoreTile& score_tile,
                            const AccumulateTile& accumulate_tile) {
  { Q::residual_tokens } -> std::convertible_to<std::size_t>;
  { Q::fits_on_observe } -> std::convertible_to<bool>;
  requires Q::residual_tokens >
  0;
  { quantizer.key_group_bytes(head_dim) } -> std::same_as<std::size_t>;
  { quantizer.projected_dim(head_dim) } -> std::same_as<std::size_t>;
  quantizer.fit_keys(fit, params);
  quantizer.encode_key(rows, head_dim, group, codes);
  quantizer.decode_key(stored, head_dim, group, out);
  quantizer.project_queries(rows, count, head_dim, group, out);
  quantizer.score_tile(score_tile, group);
  quantizer.encode_value(rows, head_dim, codes);
  quantizer.decode_value(stored, head_dim, out);
  quantizer.accumulate_tile(accumulate_tile);
};

template <class Q>
concept Quantizer = NamedPolicy<Q> && SizesTokens<Q> &&
    (QuantizesTokens<Q> || GroupsKeys<Q> || FitsKeys<Q>);

// ---------------------------------------------------------------------------------------
// Retrieval index: which stored pages a query reads.

template <class I>
concept DeclaresCoverage = requires {
  { I::reads_all } -> std::convertible_to<bool>;
};

// An index that reads a subset must track appends (it gets fp32 keys), compaction, and
// pick pages for a query.
template <class I>
concept SelectsPages = requires(I& index, typename I::HeadState& state, const AppendEvent& append,
                                std::span<const std::uint32_t> kept, const SelectContext& context,
                                std::vector<std::uint32_t>& pages) {
  index.on_append(state, append);
  index.on_compact(state, kept);
  index.select_pages(std::as_const(state), context, pages);
};

template <class I>
concept RetrievalIndex = NamedPolicy<I> && HasHeadState<I> && DeclaresCoverage<I> &&
    (I::reads_all || SelectsPages<I>);

// ---------------------------------------------------------------------------------------
// Offload backend: where cold pages live and how they come back.

template <class O>
concept StoresPages = requires(O& backend, const PageKey& key, std::span<const std::byte> bytes,
                               std::span<std::byte> destination) {
  { O::enabled } -> std::convertible_to<bool>;
  { backend.put(key, bytes) } -> std::convertible_to<bool>;
  { backend.get(key, destination) } -> std::convertible_to<bool>;
  backend.erase(key);
};

template <class O>
concept OffloadBackend = NamedPolicy<O> && StoresPages<O>;

// ---------------------------------------------------------------------------------------
// Compute backend: where page memory lives and kernels run.

template <class B>
concept AllocatesPages = requires(B& backend, std::size_t bytes, std::byte* pointer) {
  { backend.allocate(bytes) } -> std::same_as<std::byte*>;
  backend.deallocate(pointer, bytes);
  { B::host_accessible } -> std::convertible_to<bool>;
};

template <class B>
concept ComputeBackend = NamedPolicy<B> && AllocatesPages<B>;

}  // namespace kvc
