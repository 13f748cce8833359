// kvc/offload/none.hpp — offload::None: every page stays resident; nothing is offloaded.
//
// Keeps:      all pages in the compute backend's memory.
// Needs:      nothing. Cost: zero (KvCache never calls it: `enabled` is false).
// put/get decline (return false), which is the contract for "this tier holds nothing".
#pragma once

#include <kvc/core/events.hpp>

#include <cstddef>
#include <span>
#include <string_view>

namespace kvc::offload {

struct None {
  static constexpr bool enabled = false;
  static constexpr std::string_view name() noexcept { return "none"; }

  constexpr bool put(const PageKey&, std::span<const std::byte>) const noexcept { return false; }
  constexpr bool get(const PageKey&, std::span<std::byte>) const noexcept { return false; }
  constexpr void erase(const PageKey&) const noexcept {}
};

}  // namespace kvc::offload
