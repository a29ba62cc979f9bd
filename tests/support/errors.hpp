// SPDX-License-Identifier: Apache-2.0
// What the bad-input tests share: the message of the error a call throws, so a test can check
// both the error's type and that its message names the argument and what was expected.
#pragma once

#include <exception>
#include <string>

namespace daedalus::testing {

/// Runs `call` and returns the message of the E it throws; a marker string when it throws
/// something else or nothing, so a CHECK on the message fails and shows what happened.
template <class E, class F>
std::string message_of(F&& call) {
  try {
    call();
  } catch (const E& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("<other exception> ") + e.what();
  }
  return "<nothing thrown>";
}

inline bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

}  // namespace daedalus::testing
