// kvc/core/error.hpp — the exception types every kvc call throws on bad input.
//
// All errors derive from kvc::Error (itself a std::runtime_error). Messages name the
// function, the argument and both the bad and the expected value, e.g.
//   "append: k has 7 kv heads, cache has 8".
// A call that throws leaves the cache exactly as it was (strong guarantee): every check
// runs before the first write.
#pragma once

#include <kvc/core/format.hpp>

#include <stdexcept>
#include <string>
#include <utility>

namespace kvc {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A tensor's extents or strides disagree with the cache geometry or with each other.
class ShapeError : public Error {
 public:
  using Error::Error;
};

// A sequence handle that was never opened, or has been closed.
class SequenceError : public Error {
 public:
  using Error::Error;
};

// A budget that cannot be honoured (zero tokens, ratio outside (0, 1], budget on a
// cache whose scorer never evicts).
class BudgetError : public Error {
 public:
  using Error::Error;
};

// A configuration a policy or kernel cannot take (e.g. a head_dim a quantizer rejects).
class UnsupportedError : public Error {
 public:
  using Error::Error;
};

// Values a policy cannot store faithfully (NaN, Inf).
class ValueError : public Error {
 public:
  using Error::Error;
};

namespace detail {

template <class E, class... Args>
[[noreturn]] void fail(fmt::format_string<Args...> format, Args&&... args) {
  throw E(fmt::format(format, std::forward<Args>(args)...));
}

}  // namespace detail
}  // namespace kvc
