// kvc/kvc.hpp — everything: KvCache and every policy that ships with kvc.
//
//   #include <kvc/kvc.hpp>
//   kvc::KvCache<kvc::evict::H2O> cache({.layers = 32, .q_heads = 32, .kv_heads = 8,
//                                        .head_dim = 128},
//                                       {.budget = kvc::Budget::tokens(2048)});
//   auto any = kvc::make_cache("h2o:budget=2048+int8", geometry);  // by name: runtime/recipe.hpp
#pragma once

#include <kvc/backend/cpu.hpp>
#include <kvc/budget/ada_kv.hpp>
#include <kvc/budget/cake.hpp>
#include <kvc/budget/duo_attention.hpp>
#include <kvc/budget/prefix_kv.hpp>
#include <kvc/budget/pyramid_kv.hpp>
#include <kvc/budget/uniform.hpp>
#include <kvc/core/concepts.hpp>
#include <kvc/core/element.hpp>
#include <kvc/core/error.hpp>
#include <kvc/core/events.hpp>
#include <kvc/core/geometry.hpp>
#include <kvc/core/kv_cache.hpp>
#include <kvc/core/page_pool.hpp>
#include <kvc/core/stats.hpp>
#include <kvc/core/view.hpp>
#include <kvc/evict/cake_indicator.hpp>
#include <kvc/evict/d2o.hpp>
#include <kvc/evict/duo_attention.hpp>
#include <kvc/evict/expected_attention.hpp>
#include <kvc/evict/external.hpp>
#include <kvc/evict/full.hpp>
#include <kvc/evict/h2o.hpp>
#include <kvc/evict/key_diff.hpp>
#include <kvc/evict/keyformer.hpp>
#include <kvc/evict/knorm.hpp>
#include <kvc/evict/lazy_eviction.hpp>
#include <kvc/evict/snapkv.hpp>
#include <kvc/evict/streaming_llm.hpp>
#include <kvc/evict/tova.hpp>
#include <kvc/evict/window_kv.hpp>
#include <kvc/offload/none.hpp>
#include <kvc/quant/bfp.hpp>
#include <kvc/quant/dense.hpp>
#include <kvc/quant/fp8.hpp>
#include <kvc/quant/int8.hpp>
#include <kvc/quant/kivi.hpp>
#include <kvc/quant/low_rank.hpp>
#include <kvc/quant/q4_0.hpp>
#include <kvc/quant/q8_0.hpp>
#include <kvc/quant/rotated.hpp>
#include <kvc/quant/think.hpp>
#include <kvc/retrieval/exhaustive.hpp>
#include <kvc/runtime/any_cache.hpp>
#include <kvc/runtime/recipe.hpp>
#include <kvc/version.hpp>
