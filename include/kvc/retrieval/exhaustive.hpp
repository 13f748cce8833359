// kvc/retrieval/exhaustive.hpp — retrieval::Exhaustive: every query reads every stored page.
//
// Keeps:      (an index decides what is read, not what is kept) — reads everything.
// Needs:      nothing; costs nothing: attend() takes its all-pages path at compile time.
// Paper:      none — exact attention, the baseline for Quest, ShadowKV, TokenSelect.
#pragma once

#include <string_view>

namespace kvc::retrieval {

struct Exhaustive {
  struct HeadState {};
  static constexpr bool reads_all = true;
  static constexpr std::string_view name() noexcept { return "exhaustive"; }
};

}  // namespace kvc::retrieval
